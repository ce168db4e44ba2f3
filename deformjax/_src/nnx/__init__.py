"""Flax NNX front-end: modules that create parameters and call the recipes in ``_src/layers``."""
