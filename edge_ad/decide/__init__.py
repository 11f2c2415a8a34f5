"""From raw model outputs to decisions: normalization, thresholds, regions, the alert policy."""
