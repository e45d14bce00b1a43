"""dreambooth_jax: DreamBooth for Stable Diffusion in JAX/Flax.

The public API is imported lazily so that `import dreambooth_jax` stays light (and never needs torch).
"""

import os

__version__ = "0.1.0"

# We use transformers for tokenizers only and run without torch by design: its "PyTorch was not found"
# advisory would only confuse. (Advisories only; real warnings still show.)
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

_LAZY = {
    "load_pipeline": "dreambooth_jax.pipeline",
    "save_pipeline": "dreambooth_jax.pipeline",
    "Pipeline": "dreambooth_jax.pipeline",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dreambooth_jax' has no attribute {name!r}")
