"""Pallas kernels (installed as `dreambooth_jax.kernels`), each with a pure-JAX reference."""
