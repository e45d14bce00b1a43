"""Training presets (`--config NAME`), installed as the package data `dreambooth_jax.configs`."""
