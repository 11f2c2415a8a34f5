"""edge-ad runtime: OpenVINO anomaly detection on an industrial PC (no torch needed)."""

__version__ = "0.1.0"
