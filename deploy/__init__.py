"""torch -> OpenVINO IR export and bundle writing (extra [train]); see the README, "Export to OpenVINO"."""
