"""Sampling on the attention rank: the sampler and constrained decoding."""
