"""segsde: semi-supervised semantic segmentation improved by self-supervised depth estimation."""

__version__ = "0.1.0"
