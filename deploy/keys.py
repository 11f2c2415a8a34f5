"""Bundle signing keys: python -m deploy.keys --out DIR  |  python -m deploy.keys --sign BUNDLE --sign-key KEY

--out writes a new ed25519 key pair: DIR/bundle-signing.key (private, mode 0600: keep it on the
engineering PC, never on the edge PC) and DIR/bundle-signing.pub (give it to the edge PCs as
`bundle_public_key`). --sign (re-)signs an existing bundle folder, e.g. after its thresholds were
recomputed on site. The logic lives in edge_ad.model.signing (shared with export, quantize, threshold
and the runtime).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_ad.model.signing import SigningError, add_sign_key_option, generate_keypair, signing
from edge_ad.ops.tool_cli import run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.keys",
                                     description="Make a bundle signing key pair, or sign a bundle folder.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, help="folder for a new key pair (bundle-signing.key / .pub)")
    what.add_argument("--sign", type=Path, metavar="BUNDLE", help="bundle folder to sign (needs --sign-key)")
    add_sign_key_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sign is not None:
        if args.sign_key is None:
            parser.error("--sign needs --sign-key KEY")
        return run_tool(signing(lambda: args.sign, args.sign_key), (SigningError,))

    def make() -> str:
        private, public = generate_keypair(args.out)
        return f"private key {private} (mode 0600, keep it secret)\npublic key  {public} (bundle_public_key on the edge PC)"

    return run_tool(make, (SigningError, OSError))


if __name__ == "__main__":
    sys.exit(main())
