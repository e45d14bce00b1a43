"""Diffusion maths, apart from the networks: the noise schedule and training targets (`noise_schedule`), text
conditioning (`conditioning`), the samplers (`samplers`, `sigma_samplers`) and text-to-image generation
(`generation`)."""
