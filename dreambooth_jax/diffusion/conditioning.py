"""Text conditioning of the UNet: tokenization (ids and attention mask) and the text encoders' outputs."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


def tokenize(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, attention mask), int32 [N, max_length] each: padded to `max_length` (default: the tokenizer's
    `model_max_length`) and truncated, with a warning naming the dropped text.

    The mask is the tokenizer's own `attention_mask` (1 on the prompt's tokens, start and end included; 0 on
    padding), as diffusers passes it, whatever token the tokenizer pads with (CLIP's end-of-text in SD 1.x,
    `!` in SD 2.x and SDXL's second tokenizer).
    """
    max_length = max_length or tokenizer.model_max_length
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")
    distinct = list(dict.fromkeys(prompts))
    full = tokenizer(distinct, padding="longest", return_tensors="np", verbose=False)  # we warn below
    if full.input_ids.shape[-1] > max_length:
        truncated = []
        for prompt, row, mask in zip(distinct, full.input_ids, full.attention_mask):
            n = int(mask.sum())
            if n > max_length:
                truncated.append((prompt, tokenizer.decode(row[max_length - 1 : n - 1])))
        for prompt, dropped in truncated[:3]:  # once per distinct prompt, and only a few of them
            log.warning("prompt longer than %d tokens, truncated; dropped: %r (prompt %r)", max_length, dropped,
                        prompt)
        if len(truncated) > 3:
            log.warning("... and %d more prompts truncated to %d tokens", len(truncated) - 3, max_length)
    return enc.input_ids.astype(np.int32), enc.attention_mask.astype(np.int32)


def text_conditioning(pipe, params, ids, ids_2=None, mask=None):
    """The UNet's text conditioning: (context [N, L, D], pooled [N, P] or None); see `combine_encoders`. `mask`:
    the first encoder's attention mask (SD 1.x/2.x with --text_encoder_use_attention_mask)."""
    out = pipe.text_encoder.apply({"params": params["text_encoder"]}, ids, mask)
    out_2 = pipe.text_encoder_2.apply({"params": params["text_encoder_2"]}, ids_2) if pipe.is_sdxl else None
    return combine_encoders(out, out_2)


def combine_encoders(out, out_2=None):
    """(context, pooled) from the text encoders' outputs. SD 1.x/2.x (`out_2` None): the encoder's last hidden
    state, no pooled embedding. SDXL: both encoders' penultimate hidden states concatenated on the feature axis,
    and the second encoder's projected pooled output, as diffusers' pipelines and training scripts compute them."""
    if out_2 is None:
        return out.last_hidden_state, None
    context = jnp.concatenate([out.hidden_states[-2], out_2.hidden_states[-2].astype(out.hidden_states[-2].dtype)],
                              axis=-1)
    return context, out_2.text_embeds
