"""Untrained embedding rows: special tokens a base model never saw, found and (optionally) fixed.

A vocabulary can hold tokens the model was never trained on. Llama-3 *base* reserves its chat
markers and ~250 `<|reserved_special_token_N|>` ids; their embedding (and head) rows never got a
gradient, so they hold little more than zeros, with norms far below every trained row's. A chat
template that uses them (`<|start_header_id|>`, `<|eot_id|>` on a base model) then trains from
rows that mean nothing, and the head row of `<|eot_id|>` gives the model no way to learn to stop
early in training; at worst a near-zero row meets an fp16/bf16 division and gives NaN. Instruct
checkpoints trained these rows; base checkpoints did not.

The test. A row looks untrained when its L2 norm is below 0.1 x the median row norm:

* the median, because it is a trained row's norm even when thousands of rows are untrained
  (they are a small share of a 128k vocabulary), where the mean would be dragged down;
* 0.1, because trained rows spread over a small factor around that median (each is the sum of
  many updates from one shared initialisation), while a row no gradient reached keeps its tiny
  initial scale: a factor of 10 leaves a wide margin on both sides. A randomly initialised model
  (every row N(0, 0.02), as the tiny test models) has all norms within a few percent of the
  median, so it never raises the alarm. Unsloth's `fix_untrained_tokens` tests max|row| ~ 0; a
  relative threshold also catches rows that are small but not exactly zero.

The fix (`init_rows_to_mean`, training option `model.init_untrained_tokens`) sets those rows of
the embedding, and of an untied head, to the mean of the trained rows, as Unsloth does: the
token starts as an "average" token the model already knows how to process, not as noise.
Only the ids the training data actually uses are checked (Qwen's padded rows past its last
token id are untrained too, and harmless).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

UNTRAINED_FRACTION = 0.1   # of the median row norm
_ROWS = 8192               # rows per chunk: norms of a 128k x 4096 bf16 matrix without an fp32 copy


@torch.no_grad()
def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """(V,) fp32 L2 norm of every row of a (V, D) matrix, a chunk of rows at a time."""
    return torch.cat([torch.linalg.vector_norm(weight[i:i + _ROWS].float(), dim=1)
                      for i in range(0, weight.shape[0], _ROWS)])


def looks_untrained(weight: torch.Tensor) -> torch.Tensor:
    """(V,) bool: rows whose norm is below UNTRAINED_FRACTION x the median row norm."""
    norms = row_norms(weight)
    return norms < UNTRAINED_FRACTION * norms.median()


def untrained_rows(embedding: torch.Tensor, token_ids: Iterable[int],
                   head: torch.Tensor | None = None) -> list[int]:
    """The ids among `token_ids` whose embedding row (or row of an untied `head`) looks untrained."""
    ids = sorted(set(int(i) for i in token_ids))
    if not ids:
        return []
    bad = looks_untrained(embedding)
    if head is not None:
        bad |= looks_untrained(head)
    return [i for i in ids if bool(bad[i])]


def model_untrained_rows(model: nn.Module, token_ids: Iterable[int]) -> list[int]:
    """untrained_rows for a built Transformer (its head is checked unless tied)."""
    return untrained_rows(model.embed_tokens.weight, token_ids, _untied_head(model))


def _untied_head(model: nn.Module) -> torch.Tensor | None:
    head = getattr(model.lm_head, "weight", None)
    return None if head is None or head is model.embed_tokens.weight else head


@torch.no_grad()
def init_rows_to_mean(model: nn.Module, rows: list[int]) -> None:
    """Set `rows` of the embedding (and of an untied head) to the mean of the rows that look
    trained, computed in fp32 a chunk at a time (see the module docstring)."""
    if not rows:
        return
    for weight in (model.embed_tokens.weight, _untied_head(model)):
        if weight is None:
            continue
        keep = ~looks_untrained(weight)
        total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
        for i in range(0, weight.shape[0], _ROWS):
            total += weight[i:i + _ROWS][keep[i:i + _ROWS]].float().sum(0)
        weight[torch.tensor(rows, device=weight.device)] = (total / keep.sum()).to(weight.dtype)


def special_ids(tokenizer, token_ids: Iterable[int]) -> set[int]:
    """The ids among `token_ids` that are the tokenizer's special or added tokens."""
    marked = set(tokenizer.special) | {t.id for t in tokenizer.added.values()}
    return marked & set(int(i) for i in token_ids)


def untrained_message(tokenizer, rows: list[int], fixed: bool) -> str:
    """One line for the user: which tokens, and what was done or can be done about them."""
    names = ", ".join(f"{tokenizer.decode([i])!r} ({i})" for i in rows[:6]) + (" ..." if len(rows) > 6 else "")
    if fixed:
        return (f"initialised the embedding rows of {len(rows)} untrained special token(s) to the mean "
                f"of the trained rows: {names}")
    return (f"warning: {len(rows)} special token(s) the data uses have embedding rows that look untrained "
            f"(norm < {UNTRAINED_FRACTION} x the median row's, as in base checkpoints): {names}; set "
            "model.init_untrained_tokens=true (full fine-tuning) to start them at the mean of the trained rows")
