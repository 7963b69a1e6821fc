"""Text conditioning: prompts -> CLIP token ids -> the UNet's context.

Tokenising is host work (transformers' CLIPTokenizer); encoding is a pure function of the
text encoder's params, run inside the sampler's or the train step's jit. Prompts longer
than the encoder reads are truncated as diffusers does, with a warning.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rectflow_jax.models.clip_text import CLIPTextModel

log = logging.getLogger("rectflow")


class TextConditioner:
    def __init__(self, tokenizer, text_encoder: CLIPTextModel, *, clip_skip: int = 0):
        self.tokenizer, self.text_encoder, self.clip_skip = tokenizer, text_encoder, int(clip_skip)
        if not 0 <= self.clip_skip < text_encoder.num_hidden_layers:
            raise ValueError(f"clip_skip must lie in [0, {text_encoder.num_hidden_layers}), got {clip_skip}")

    @property
    def length(self) -> int:
        return min(self.tokenizer.model_max_length, self.text_encoder.max_position_embeddings)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, length) int32 ids, padded to the maximum length and truncated like diffusers (with a warning)."""
        prompts = [str(p) for p in prompts]
        for k, full in enumerate(self.tokenizer(prompts, truncation=False).input_ids):
            if len(full) > self.length:
                log.warning("prompt %d is %d tokens long; the text encoder reads only the first %d, as in "
                            "diffusers, and the rest is dropped", k, len(full), self.length)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.length, truncation=True,
                             return_tensors="np").input_ids
        return ids.astype(np.int32)

    @functools.lru_cache(maxsize=8)
    def negative_ids(self, negative_prompt: str = "") -> np.ndarray:
        """(1, length) ids of the negative prompt (the empty one: the unconditional text), cached."""
        return self.tokenize([negative_prompt])

    def null_cond(self) -> dict[str, np.ndarray]:
        """The condition that condition dropout substitutes: the empty prompt."""
        return {"input_ids": self.negative_ids("")}

    def encode(self, params: Any, ids: jax.Array) -> jax.Array:
        """(N, L) ids -> (N, L, width) context; traceable."""
        return self.text_encoder.apply({"params": params}, jnp.asarray(ids, jnp.int32), self.clip_skip)
