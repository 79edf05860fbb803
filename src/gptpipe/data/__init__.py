"""Data layer: sources (local files, Hub datasets, the tiny world), mixing, splits and packing."""
