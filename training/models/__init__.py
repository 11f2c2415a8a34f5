"""One folder per algorithm; each exports one nn.Module mapping images to (anomaly map, score)."""
