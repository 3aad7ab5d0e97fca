"""Turning a row of logits into the next token: greedy, temperature, top-k, top-p.

Greedy decoding takes the argmax. Sampling divides the logits by a temperature (< 1 sharpens
the distribution, > 1 flattens it), optionally keeps only the k most likely tokens (top-k) or the
smallest set of most likely tokens whose probabilities reach p (top-p, "nucleus"), and draws
from the softmax of what is left. Used by `Transformer.generate_steps` in model/llama.py.
"""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V): argmax, or sample after temperature/top-k/top-p.

    top-k keeps the k largest logits; top-p keeps the smallest set of tokens, most likely first,
    whose probabilities sum to at least p (the most likely token is always kept).
    """
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already >= p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
