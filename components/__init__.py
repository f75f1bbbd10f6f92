"""Thin KFP v2 components over gpunet_core."""
