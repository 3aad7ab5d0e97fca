"""Masked next-token cross-entropy, summed, computed in chunks so full fp32 logits never exist.

Labels are aligned with input_ids (the Hugging Face convention): position t of the model
predicts token t+1, so the pairs are (hidden[:, t], labels[:, t+1]). A label of -100 means
"no loss here": prompt tokens, padding, the first token of each packed sample (nothing in the
same sample precedes it; its prediction would cross a sample boundary).

Why chunks. Logits are (B, T, V): for batch 8 x 2048 tokens and a 32k vocabulary that is
2 GiB in fp32, more than the rest of a small model's activations together. So:
  1. keep only the positions that have a label: hidden[mask] -> (N, D), N trainable tokens
     (masked prompt tokens never reach the output head at all);
  2. for each chunk of C of those rows: logits = lm_head(h_chunk) -> (C, V), upcast to fp32
     (log-softmax in bf16 loses the small probabilities), cross-entropy summed;
  3. wrap each chunk in activation checkpointing, so backward recomputes that chunk's logits
     instead of every chunk keeping its (C, V) logits alive until backward. Peak extra memory
     is one chunk of logits, whatever T is. With a single chunk there is nothing to gain
     (that one chunk's logits are the peak either way), so it is not recomputed.

The function returns the SUM of the losses and the number of trainable tokens; it does not
divide. The caller divides by the trainable tokens of the whole optimizer step (all
micro-batches, all ranks): averaging per micro-batch weights a token in a short micro-batch
more than one in a long one, so accumulation would not equal one big batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_ce(head: torch.nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # (C, D) -> (C, V) in the model dtype, then fp32 for log-softmax
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def masked_ce_sum(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """Sum of next-token CE over labelled positions, and how many there are.

    hidden: (B, T, D) final-norm hidden states (`model(..., return_hidden=True)`);
    labels: (B, T) long, aligned with input_ids, -100 = ignore. Returns (fp32 scalar, int).
    """
    head = model.lm_head
    targets = labels[:, 1:]                                   # (B, T-1): what position t predicts
    valid = targets != IGNORE_INDEX                           # (B, T-1) bool
    pos_mask = torch.zeros_like(labels, dtype=torch.bool)     # (B, T): positions that predict
    pos_mask[:, :-1] = valid
    h = hidden[pos_mask]                                      # (N, D) gathered, row-major
    t = targets[valid]                                        # (N,) same order
    n = t.numel()
    if n == 0:  # keep the graph connected so backward (and FSDP's hooks) still run
        return hidden.sum().float() * 0.0, 0
    recompute = torch.is_grad_enabled() and n > chunk_size
    total = None
    for s in range(0, n, chunk_size):
        hc, tc = h[s:s + chunk_size], t[s:s + chunk_size]
        part = (checkpoint(_chunk_ce, head, hc, tc, use_reentrant=False) if recompute
                else _chunk_ce(head, hc, tc))
        total = part if total is None else total + part
    return total, n
