"""One optimizer step's forward/backward, and the held-out loss.

The loss of a step is normalised by the trainable tokens of the WHOLE step, counted first:

    gradient = d/dw [ sum over the step's micro-batches of token losses / N_step ]

so gradient accumulation over micro-batches (and data parallelism over processes) gives
exactly what one big batch gives. Averaging per micro-batch instead, (x1/n1 + x2/n2) / 2, would
over-weight the tokens of short micro-batches (the bug transformers fixed in PR #34191). Each
micro-batch's loss SUM is multiplied by `scale` before its backward: 1 / N_step in one process,
`distributed.loss_scale(N_step)` = world / N_step under FSDP, whose gradient averaging over the
world processes the factor undoes.
"""
from __future__ import annotations

import math

import torch

from model.loss import IGNORE_INDEX, loss_over_rows, masked_ce_sum
from training import distributed as D

Rows = dict[str, torch.Tensor]


def to_device(rows: Rows, idx: list[int], device) -> Rows:
    """Rows `idx` of the pre-collated (N, T) tensors -> a (B, T) int64 micro-batch on `device`."""
    sel = torch.tensor(idx)
    return {k: v.index_select(0, sel).to(device, non_blocking=True).long() for k, v in rows.items()}


def trainable_tokens(batch: Rows) -> int:
    """Positions whose next token is trained (labels[:, 1:] not ignored)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def forward_backward(model, batches: list[Rows], scale: float, chunk: int) -> float:
    """Backprop every micro-batch's loss SUM times `scale`; returns this process's loss sum."""
    total = torch.zeros((), dtype=torch.float32, device=batches[0]["input_ids"].device)
    for b in batches:
        hidden = model(b["input_ids"], position_ids=b["position_ids"], seq_ids=b["seq_ids"],
                       return_hidden=True)
        loss_sum, _ = masked_ce_sum(model, hidden, b["labels"], chunk_size=chunk)
        (loss_sum * scale).backward()
        total += loss_sum.detach()
    return total.item()  # one device sync per step, not per micro-batch


def heldout_loss(model, rows: Rows, batch_size: int, chunk: int, device) -> tuple[float, float]:
    """Held-out (mean loss per trainable token, perplexity), over every process's share."""
    batches = D.eval_batches(len(rows["input_ids"]), batch_size, D.rank(), D.world_size())
    loss, n = loss_over_rows(model, rows, batches, chunk)
    loss, n = D.all_reduce_sum(loss, device), D.all_reduce_sum(n, device)
    mean = loss / max(n, 1)
    return mean, math.exp(min(mean, 50.0))
