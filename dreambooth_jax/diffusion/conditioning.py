"""Tokenization of prompts: token ids and attention masks, with a warning naming truncated text. (What the
text encoders make of them is each model family's own: `families`.)"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def tokenize_with_mask(tokenizer, prompts: Sequence[str],
                       max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, attention mask), int32 [N, max_length] each: padded to `max_length` (default: the
    tokenizer's `model_max_length`) and truncated, with a warning naming the dropped text.

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
            log.warning("prompt longer than %d tokens, truncated; dropped: %r (prompt %r)", max_length,
                        dropped, prompt)
        if len(truncated) > 3:
            log.warning("... and %d more prompts truncated to %d tokens", len(truncated) - 3, max_length)
    return enc.input_ids.astype(np.int32), enc.attention_mask.astype(np.int32)
