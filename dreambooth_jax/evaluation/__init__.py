"""The DreamBooth paper's evaluation: the TFDS `dreambooth` dataset, the encoders and their preprocessing, the
metrics (DINO, CLIP-I, CLIP-T), and the reproduction driver behind `python -m dreambooth_jax.reproduce`."""
