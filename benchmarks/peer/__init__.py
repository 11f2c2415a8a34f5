"""Peer benchmark helpers: the anomalib worker (runs in anomalib's own venv) and name mappings onto timm."""
