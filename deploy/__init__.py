"""torch -> OpenVINO IR export and bundle writing (extra [train]); see deploy/README_SECTION.md."""
