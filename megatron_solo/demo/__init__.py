"""The quick-start demo: a tiny SOLO that learns to read handwritten digits from raw pixels."""
