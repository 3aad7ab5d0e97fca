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
  3. the gradient of a summed cross-entropy with respect to the logits, softmax - onehot, is
     known as soon as the logits are. `_LinearCrossEntropy` turns each chunk's logits into
     the gradients of h and of the head's weight during the forward and drops them, so no
     (C, V) tensor lives until backward and none is recomputed: the head's matmul runs once.
     Peak extra memory is one chunk of logits, whatever T is. A head that is not a plain
     nn.Linear (LoRA-wrapped, 4-bit) takes the generic path instead: each chunk under
     activation checkpointing, so backward recomputes that chunk's logits.

The function returns the SUM of the losses and the number of trainable tokens; it does not
divide. The caller divides by the trainable tokens of the whole optimizer step (all
micro-batches, all ranks): averaging per micro-batch weights a token in a short micro-batch
more than one in a long one, so accumulation would not equal one big batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.matmul import forward_mm, input_grad_mm, weight_grad

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i) with its gradients made chunk by chunk during the forward.

    The gradient of a summed cross-entropy with respect to the logits is known as soon as the
    logits are: softmax(z) - onehot(t). So each chunk's (C, V) logits are turned into that
    gradient at once and multiplied out, dh = G W (C, D) and dW += G^T h (V, D), and then
    dropped. Backward only scales the stored dh, dW by the incoming scalar gradient. Peak extra
    memory is one chunk of logits, as with recomputation, but the head's forward matmul runs
    once instead of twice (about 1/15 of a small model's step).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        dev = h.device.type
        # under autocast the head runs in the autocast dtype, as the module call would
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(dev, enabled=False):
            w = weight.to(dtype)
            dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
            dw = None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.shape[0], chunk):
                hc, tc = h[s:s + chunk].to(dtype), targets[s:s + chunk]
                z = forward_mm(hc, w).float()                         # (C, V) logits, fp32
                # log-sum-exp by hand, in z's buffer (torch.logsumexp makes a (C, V) temporary):
                # e = exp(z - max) in place, lse = log(sum e) + max, softmax = e / sum e
                z_t = z.gather(1, tc[:, None])[:, 0]                  # target logits (C,)
                zmax = z.amax(dim=-1, keepdim=True)
                e_sum = z.sub_(zmax).exp_().sum(dim=-1, keepdim=True)
                total += (e_sum.log() + zmax - z_t[:, None]).sum()
                g = z.div_(e_sum)                                     # softmax
                g[torch.arange(len(tc), device=g.device), tc] -= 1.0  # - onehot
                if need_h:
                    dh[s:s + chunk] = input_grad_mm(g.to(dtype), w)   # G @ W
                if need_w and s == 0:  # (V, D) written once
                    dw = weight_grad(g, hc.float())                   # G^T @ h
                elif need_w:  # in place: a second (V, D) buffer would cost as much as dW itself
                    dw.addmm_(g.t(), hc.float())
        ctx.dh, ctx.dw, ctx.w_dtype = dh, dw, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw = ctx.dh, ctx.dw
        ctx.dh = ctx.dw = None  # free them as soon as they are handed over
        if dh is not None:
            dh = dh.mul_(grad.to(dh.dtype))
        if dw is not None:
            dw = dw.mul_(grad).to(ctx.w_dtype)
        return dh, dw, None, None


def auto_chunk(vocab_size: int) -> int:
    """Rows per chunk: ~8 MiB of fp32 logits, at least 128 rows (512 rows for a 4k vocabulary,
    128 for 32k (16 MiB) and 128k (63 MiB)). Bigger chunks run the head's products a little
    faster (110M shape: 0.94 s for one 2048-row chunk vs 1.07 s in 128-row chunks), but a
    chunk's logits are the largest temporary of the step, at its memory peak."""
    return max(128, (1 << 21) // vocab_size)


def _chunk_ce(head: torch.nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # (C, D) -> (C, V) in the model dtype, then fp32 for log-softmax
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def masked_ce_sum(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                  chunk_size: int = 0) -> tuple[torch.Tensor, int]:
    """Sum of next-token CE over labelled positions, and how many there are.

    hidden: (B, T, D) final-norm hidden states (`model(..., return_hidden=True)`);
    labels: (B, T) long, aligned with input_ids, -100 = ignore. Returns (fp32 scalar, int).
    """
    head = model.lm_head
    chunk_size = chunk_size or auto_chunk(head.out_features)
    targets = labels[:, 1:]                                   # (B, T-1): what position t predicts
    valid = targets != IGNORE_INDEX                           # (B, T-1) bool
    pos_mask = torch.zeros_like(labels, dtype=torch.bool)     # (B, T): positions that predict
    pos_mask[:, :-1] = valid
    h = hidden[pos_mask]                                      # (N, D) gathered, row-major
    t = targets[valid]                                        # (N,) same order
    n = t.numel()
    if n == 0:  # keep the graph connected so backward (and FSDP's hooks) still run
        return hidden.sum().float() * 0.0, 0
    if torch.is_grad_enabled() and isinstance(head, torch.nn.Linear) and head.bias is None:
        return _LinearCrossEntropy.apply(h, head.weight, t, chunk_size), n
    recompute = torch.is_grad_enabled() and n > chunk_size
    total = None
    for s in range(0, n, chunk_size):
        hc, tc = h[s:s + chunk_size], t[s:s + chunk_size]
        part = (checkpoint(_chunk_ce, head, hc, tc, use_reentrant=False) if recompute
                else _chunk_ce(head, hc, tc))
        total = part if total is None else total + part
    return total, n


@torch.no_grad()
def loss_over_rows(model: torch.nn.Module, rows: dict[str, torch.Tensor], batches: list[list[int]],
                   chunk_size: int = 0) -> tuple[float, int]:
    """(sum of masked CE, trainable tokens) over the packed rows in `batches` (lists of row
    indices into the (N, T) tensors of `rows`): the held-out loss of training and evaluation.

    The caller divides sum by count over ALL its rows (and processes), never averaging per
    batch: batches hold different numbers of assistant tokens. An empty batch runs a forward
    on row 0 without counting it, so that every FSDP process joins the same collectives.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    try:
        for idx in batches:
            sel = torch.tensor(idx or [0])
            b = {k: v.index_select(0, sel).to(device, non_blocking=True).long() for k, v in rows.items()}
            hidden = model(b["input_ids"], position_ids=b["position_ids"], seq_ids=b["seq_ids"],
                           return_hidden=True)                      # (B, T, D)
            s, k = masked_ce_sum(model, hidden, b["labels"], chunk_size)
            if idx:
                total, n = total + float(s), n + k
    finally:
        model.train(was_training)
    return total, n
