"""Autoregressive sampling with the decoding state: one parallel prefill, then one step per token
(O(1) for SSM layers, over the KV cache for attention layers)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ssmforge.errors import ConfigError


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ConfigError unless 0 <= temperature < inf, top_k >= 0 and 0 < top_p <= 1."""
    if not 0 <= temperature < math.inf or top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"sampling needs a finite temperature >= 0, top_k >= 0 and 0 < top_p <= 1 "
                          f"(got {temperature}, {top_k}, {top_p})")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (batch, vocab) -> token ids (batch,). temperature 0 is greedy; top_k 0 and top_p 1 keep all."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None, vocab_size: int | None = None,
             generator: torch.Generator | None = None,
             stop: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """input_ids (batch, L) -> (batch, L + new) with new <= max_new_tokens (stops when every row hit eos).

    vocab_size limits sampling to real tokens when the embedding is padded beyond the tokenizer. `stop`, given
    the new tokens so far (batch, n), says which rows are done (batch,) bool (a stop string decoded, say);
    generation ends when every row is done, and a done row, like one that hit eos, gets eos_id (when given)
    from then on.
    """
    state = model.allocate_state(input_ids.shape[0])
    logits = model(input_ids, state=state)[:, -1]
    out = [input_ids]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        out.append(token[:, None])
        if stop is not None:
            finished |= stop(torch.cat(out[1:], dim=1)).to(finished.device)
        if finished.all():
            break
        logits = model.step(token, state)
    return torch.cat(out, dim=1)
