"""Flax implementations of the Stable Diffusion networks, parameter-compatible with diffusers."""
