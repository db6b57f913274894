"""Evaluation metrics (depth here; segmentation confusion matrices join later)."""
