"""The DreamBooth paper's metrics (Ruiz et al. 2023, sec. 4.1): DINO, CLIP-I and CLIP-T.

- DINO: mean pairwise cosine similarity between the ViT-S/16 DINO embeddings (CLS token of the last
  layer's layernormed output) of the generated and the real images of the subject.
- CLIP-I: the same with CLIP ViT-B/32 image embeddings.
- CLIP-T: mean cosine similarity between the CLIP text embedding of the prompt and the CLIP image
  embedding of the image generated from it.

Each generated image gets its mean similarity to all the real images, so the mean over the images is the
mean over all (generated, real) pairs; std is over the generated images. The encoders run jit-compiled,
data parallel over every device, on fixed-size batches (one compile per encoder).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dreambooth_jax.errors import UsageError

log = logging.getLogger(__name__)

# The encoders the paper's metrics are defined with.
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
METRICS = ("dino", "clip_i", "clip_t")
METRIC_NAMES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
# Table 1 of the paper: DINO, CLIP-I, CLIP-T (None: not applicable).
PAPER_TABLE_1 = {
    "Real images": (0.774, 0.885, None),
    "DreamBooth (Imagen)": (0.696, 0.812, 0.306),
    "DreamBooth (Stable Diffusion)": (0.668, 0.803, 0.305),
    "Textual Inversion (Stable Diffusion)": (0.569, 0.780, 0.255),
}


class Embedder(Protocol):
    """What `evaluate` needs of its encoders: an `encoders.Encoders` (not imported: it imports ours)."""

    models: dict[str, str]  # {'dino': id, 'clip': id}

    def embed(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]: ...

    def clip_texts(self, prompts: Sequence[str]) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------------ the scores
def stats(values) -> dict:
    """{'mean', 'std', 'n'} of a sequence of scores."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": int(len(values))}


def per_image_scores(generated: dict, real: dict, text: np.ndarray) -> dict[str, np.ndarray]:
    """Each generated image's scores: its mean cosine similarity to the real images (DINO, CLIP-I) and its
    cosine similarity to its prompt (CLIP-T). Inputs are L2-normalized embeddings: `generated` / `real`
    {'dino': [N, D], 'clip': [N, E]}, `text` [N, E] (the prompt of each generated image)."""
    return {
        "dino": (generated["dino"] @ real["dino"].T).mean(axis=1),
        "clip_i": (generated["clip"] @ real["clip"].T).mean(axis=1),
        "clip_t": np.sum(generated["clip"] * text, axis=1),
    }


def real_baseline(real: dict) -> dict:
    """The 'real images' row of Table 1: mean similarity between distinct real images of the subject."""
    out = {}
    for metric, key in (("dino", "dino"), ("clip_i", "clip")):
        sims = real[key] @ real[key].T
        n = len(sims)
        out[metric] = stats(sims[~np.eye(n, dtype=bool)]) if n > 1 else None
    return out


def summarize(scores: dict[str, np.ndarray], prompts: Sequence[str]) -> dict:
    """Overall and per-prompt mean / std of each metric."""
    prompts = np.asarray(prompts, dtype=object)
    per_prompt = {}
    for prompt in dict.fromkeys(prompts.tolist()):  # first-seen order
        mask = prompts == prompt
        per_prompt[prompt] = {m: stats(scores[m][mask]) for m in METRICS}
    return {"overall": {m: stats(scores[m]) for m in METRICS}, "per_prompt": per_prompt}


def strip_token(prompt: str, token: str | None) -> str:
    """'a sks dog in the jungle' -> 'a dog in the jungle': the prompt CLIP-T scores, without the rare token
    (it means nothing to CLIP)."""
    if not token:
        return prompt
    return " ".join(w for w in prompt.split() if w != token)


@dataclasses.dataclass
class Evaluation:
    """Everything `evaluate` computes; `to_json` is what the CLI writes."""

    summary: dict
    real: dict
    scores: dict[str, np.ndarray]
    files: list[str]
    prompts: list[str]
    info: dict

    def to_json(self) -> dict:
        images = [{"file": f, "prompt": p, **{m: float(self.scores[m][i]) for m in METRICS}}
                  for i, (f, p) in enumerate(zip(self.files, self.prompts))]
        return {**self.info, **self.summary, "real_images": self.real, "images": images}


def evaluate(encoders: Embedder, generated: Sequence[np.ndarray], prompts: Sequence[str],
             real: Sequence[np.ndarray], *, files: Sequence[str] | None = None,
             unique_token: str | None = None, info: dict | None = None) -> Evaluation:
    """DINO / CLIP-I / CLIP-T of `generated` images (uint8 HWC) made from `prompts`, against `real`."""
    if len(generated) != len(prompts):
        raise UsageError(f"{len(generated)} images but {len(prompts)} prompts")
    if not generated or not real:
        raise UsageError("no generated images" if not generated else "no real images")
    gen, ref = encoders.embed(generated), encoders.embed(real)
    text_prompts = [strip_token(p, unique_token) for p in prompts]
    unique = list(dict.fromkeys(text_prompts))
    text = encoders.clip_texts(unique)[[unique.index(p) for p in text_prompts]]
    scores = per_image_scores(gen, ref, text)
    info = {**(info or {}), "dino_model": encoders.models["dino"], "clip_model": encoders.models["clip"],
            "num_generated": len(generated), "num_real": len(real),
            "clip_t_prompts": f"unique token {unique_token!r} removed" if unique_token else "as generated"}
    return Evaluation(summary=summarize(scores, prompts), real=real_baseline(ref), scores=scores,
                      files=list(files or [str(i) for i in range(len(generated))]), prompts=list(prompts),
                      info=info)


# ------------------------------------------------------------------------------------------------- reporting
def format_stats(values: dict | None) -> str:
    """'0.668 ± 0.031' for a `stats` dict; '-' when there is nothing (None, or no values)."""
    return "-" if not values or not values.get("n") else f"{values['mean']:.3f} ± {values['std']:.3f}"


def markdown_table(evaluation: Evaluation, *, per_prompt: bool = True) -> str:
    """A readable Markdown table: overall, the real-image baseline, and (optionally) one row per prompt."""
    head = "| | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " | images |\n|---|---|---|---|---|\n"
    s = evaluation.summary
    rows = ["| **all prompts** | " + " | ".join(format_stats(s["overall"][m]) for m in METRICS)
            + f" | {s['overall']['dino']['n']} |"]
    real = evaluation.real
    rows.append(f"| real images (pairs) | {format_stats(real['dino'])} | {format_stats(real['clip_i'])} | - "
                f"| {evaluation.info['num_real']} |")
    if per_prompt:
        rows += [f"| {p} | " + " | ".join(format_stats(v[m]) for m in METRICS) + f" | {v['dino']['n']} |"
                 for p, v in s["per_prompt"].items()]
    return head + "\n".join(rows) + "\n"
