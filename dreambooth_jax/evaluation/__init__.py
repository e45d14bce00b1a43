"""The DreamBooth paper's evaluation: the metrics (DINO, CLIP-I, CLIP-T), their encoders and the encoders'
preprocessing. The dataset is in `dreambooth_jax.datasets`, the paper's protocol in `dreambooth_jax.paper`."""
