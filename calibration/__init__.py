"""Post-export calibration: NNCF INT8 quantization on held-out normal images, and threshold recalibration on site images."""
