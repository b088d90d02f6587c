"""``propd bench``: Spec-Bench-style comparative runs of presets and transformers baselines."""
