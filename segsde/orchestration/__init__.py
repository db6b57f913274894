"""Stages of a study, their cache keys, and (later) their scheduling on Ray."""
