"""Semi-supervised segmentation trainer: config, networks, data, step, Ray Train loop and driver."""
