"""The model stage: the bundle on disk, what the model sees, and OpenVINO inference."""
