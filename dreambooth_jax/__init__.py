"""dreambooth_jax: DreamBooth for Stable Diffusion in JAX/Flax.

    import dreambooth_jax as dbj
    pipe = dbj.load_pipeline("runwayml/stable-diffusion-v1-5", dtype="bf16")
    images = dbj.generate(pipe, ["a photo of sks dog"], num_inference_steps=30, seed=0)   # float [N, H, W, 3]
    dbj.save_pipeline(pipe, "out/")                                                      # diffusers layout
    unet, unet_params = dbj.load_component("out/unet", "unet")

The public API is imported lazily so that `import dreambooth_jax` stays light (and never needs torch).
"""

import importlib
import os

__version__ = "0.1.0"

# We use transformers for tokenizers only and run without torch by design: its "PyTorch was not found"
# advisory would only confuse. (Advisories only; real warnings still show.)
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

_LAZY = {
    "load_pipeline": "dreambooth_jax.pipeline",
    "save_pipeline": "dreambooth_jax.pipeline",
    "load_component": "dreambooth_jax.pipeline",
    "Pipeline": "dreambooth_jax.pipeline",
    "generate": "dreambooth_jax.diffusion.generation",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dreambooth_jax' has no attribute {name!r}")
