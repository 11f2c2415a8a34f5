"""PyTorch training side of edge-ad (extra [train]); the runtime in edge_ad never imports it."""
