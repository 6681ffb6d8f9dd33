"""ml_collections configs: `default.py` is the embedded default; others build on it."""
