"""Data layer: the synthetic street-scene testbed, Cityscapes, the shared store format and splits."""
