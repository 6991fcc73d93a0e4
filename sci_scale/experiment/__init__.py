"""Experiments built from whole training runs (``sci-scale experiment``)."""
