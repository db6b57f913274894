"""Self-supervised depth estimation (monodepth2-style) from frame triplets."""
