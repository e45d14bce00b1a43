"""Networks only, in Flax, parameter-compatible with diffusers/transformers: the CLIP text encoder, the UNet
(and its blocks), the VAE, attention, and the evaluation image encoders (DINO ViT, CLIP vision)."""
