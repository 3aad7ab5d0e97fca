"""AdamW with the usual two parameter groups, and a cosine learning-rate schedule with warmup.

Weight decay pulls a weight towards zero: w <- w - lr * wd * w, applied beside Adam's update
(decoupled, "AdamW"). That is a prior that matrices should stay small; it makes no sense for
RMSNorm gains (their neutral value is 1, not 0) nor for biases and other 1-D vectors, whose
decay only fights the scale the network needs. So parameters with `ndim < 2` go in a group with
weight_decay = 0. Only parameters with `requires_grad` are handed to the optimizer, so frozen
weights (LoRA's base) get no Adam state at all: 8 bytes/param saved.

The schedule, with s the optimizer step (0-based) and S the total number of steps:

    warmup  (s < W):  lr(s) = lr * (s + 1) / W
    cosine  (s >= W): lr(s) = lr * (m + (1 - m) * 0.5 * (1 + cos(pi * p))),  p = (s - W) / (S - W)

decaying from lr to m*lr (m = min_lr_ratio). Warmup starts at lr/W, not 0, so step 0 is not a
wasted step. The schedule is a pure function of the step, so resuming needs only the step.
"""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into [decayed matrices, undecayed norms/biases/1-D]."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    groups = [g for g in param_groups(model, weight_decay) if g["params"]]
    # fused: one kernel updates each tensor in place; the default "foreach" implementation
    # builds temporaries as large as all trainable weights (+420 MiB at the step for 110M params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (see the module docstring)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total, min_ratio))
