"""`python -m edge_ad ...` is the same as the `edge-ad` command."""

import sys

from edge_ad.ops.cli import main

sys.exit(main())
