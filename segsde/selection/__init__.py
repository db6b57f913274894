"""Automatic data selection for annotation and its baselines: IFP, scores, Ray Train jobs and driver."""
