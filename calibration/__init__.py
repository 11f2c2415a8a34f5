"""Calibration of a deployed bundle: NNCF INT8 quantization on held-out normal images (quantize),
and decision-threshold recalibration (threshold)."""
