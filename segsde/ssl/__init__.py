"""Semi-supervised parts: mean teacher, pseudo-labels, ClassMix/DepthMix masks and strong augmentation."""
