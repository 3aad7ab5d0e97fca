"""Training speed and memory on the CPU, applied to a built model from outside.

model/llama.py is the plain math. For training, `apply(model)` swaps three things into a built
model (after LoRA/QLoRA wrapping, before FSDP sharding); parameters, state-dict names and
results stay the same (the gradients bit for bit, tests/test_fused_ops.py):

1. The GEMM library per product (model/matmul.py). Each fp32 product of a linear layer (forward,
   input grad, weight grad) runs on MKL (torch's default) or oneDNN, whichever a one-time
   calibration found clearly faster on this machine (cached per CPU, torch version and library
   caps). Where any product goes to oneDNN, every plain nn.Linear becomes `matmul.Linear`; the
   fused loss head and the 4-bit linear follow the same routing. On an AMD Zen 5 (AVX-512, which
   MKL does not use on AMD) oneDNN runs them up to 2x faster; on an Intel Xeon, and on AVX2-only
   CPUs, the two are about equal and oneDNN's copies of transposed operands make its weight
   gradients slower, so everything stays on MKL and the linears are not swapped at all.
2. Lean RMSNorm and SwiGLU backward. Left to autograd, the chain of small ops in an RMSNorm keeps
   x, x * r and more for backward, and silu(a) * b keeps silu(a) beside a and b. The autograd
   Functions below keep only their inputs (and r, one float per row) and recompute the cheap
   elementwise rest in backward, with the derivative written by hand:

       RMSNorm  y = w * (x * r),  r = rsqrt(mean(x^2) + eps)
                g' = g * w,  dx = r * (g' - xhat * mean(g' * xhat)),  dw = sum_rows(g * xhat)
       SwiGLU   y = silu(a) * b,  s = sigmoid(a)
                da = g * b * s * (1 + a * (1 - s)),  db = g * silu(a)

3. Recomputed block activations (model/recompute.py): the norm outputs that the projections
   keep for their weight gradients, and the SwiGLU output down_proj keeps, are stored as a
   recipe and recomputed in backward (a few elementwise passes, no matmul repeated); the
   recomputed SwiGLU hands its silu(a) on to the SwiGLU backward, which would otherwise make it
   again. It costs ~2% of a pico-base step and saves 21% of its training memory (peak 266 ->
   210 MiB; HF's: 417), so it is on by default. A block under whole-block activation
   checkpointing sets `recompute = False`: the checkpoint already keeps nothing inside it.

Each piece has its own switch: `apply(model, onednn="auto"|True|False, lean_backward=...,
recompute=...)`; train.py's `train.speedups = false` turns them all off.

Under `torch.compile` (train.compile) 2 and 3 are left out (`apply(model, compiled=True)`):
inductor fuses the norm, RoPE and SwiGLU elementwise chains into a few loops, and its
partitioner chooses by itself which cheap values to recompute in backward instead of keeping;
the hand-written Functions and the saved-tensor recipes would be opaque to both. Measured on
pico-base (full fine-tuning, 8 x 256 tokens, 2 threads, Intel Xeon family 6 model 207): eager
with 2 and 3 0.419 s a step; the plain block compiled 0.379 s (first step 8.5 s); the lean
block compiled no faster than eager. The price is memory: inductor keeps the norm and SwiGLU
outputs that 3 recomputes (peak 287 vs 214 MiB), so compile stays a switch, off by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.llama import DecoderLayer, RMSNorm, _acc
from model.matmul import ONEDNN, TORCH, Linear, Routing, calibrate, set_routing
from model.recompute import recompute_saved


class _RMSNormFn(torch.autograd.Function):
    """y = w * (x * r).to(dtype), keeping only x and r (B, T, 1) for backward (see above).
    The forward ops are RMSNorm.forward's, in the same order, so the values are identical."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(_acc(x))
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        xhat = x.to(r.dtype) * r
        dw = ((g.to(r.dtype) * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
              if ctx.needs_input_grad[1] else None)
        gw = (g * weight).to(r.dtype)
        dx = r * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


class _SwiGLUFn(torch.autograd.Function):
    """silu(a) * b, keeping only a and b (B, T, F) for backward: one (B, T, F) tensor per layer
    less than autograd keeps, the largest activations of the block.

    `silu_memo` is a list through which the recomputation of this output for down_proj's
    weight gradient (which runs just before this backward) hands over the silu(a) it made,
    so that backward does not compute it a second time."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, silu_memo: list) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.silu_memo = silu_memo
        return swiglu(a, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, b = ctx.saved_tensors
        # the very kernels autograd would run for silu(a) * b, minus the saved silu(a), each
        # writing into a buffer it just made: two (B, T, F) temporaries at the peak, not four
        db = (ctx.silu_memo.pop() if ctx.silu_memo else F.silu(a)).mul_(g)
        gb = g * b
        return torch.ops.aten.silu_backward.grad_input(gb, a, grad_input=gb), db, None


def _swiglu_leaving_silu(a: torch.Tensor, b: torch.Tensor, silu_memo: list) -> torch.Tensor:
    """swiglu(a, b), recomputed in backward, with silu(a) left in silu_memo for _SwiGLUFn."""
    sa = F.silu(a)
    silu_memo.append(sa)
    return sa * b


class LeanRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


class LeanDecoderLayer(DecoderLayer):
    """The same block; SwiGLU through _SwiGLUFn and, with `recompute`, the norm and SwiGLU
    outputs recomputed in backward instead of kept (model/recompute.py)."""
    recompute = True
    lean_backward = True

    def forward(self, h, cos, sin, mask, cache=None, layer=0):
        x = self.input_layernorm(h)
        with recompute_saved(x, partial(self.input_layernorm, h), self.recompute):  # keep h, not x
            h = h + self.self_attn(x, cos, sin, mask, cache, layer)
        x = self.post_attention_layernorm(h)
        with recompute_saved(x, partial(self.post_attention_layernorm, h), self.recompute):
            return h + self._mlp(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        a, b = mlp.gate_proj(x), mlp.up_proj(x)
        if self.lean_backward:
            memo: list[torch.Tensor] = []
            s = _SwiGLUFn.apply(a, b, memo)
            recompute_s = partial(_swiglu_leaving_silu, a, b, memo)
        else:
            s, recompute_s = swiglu(a, b), partial(swiglu, a, b)
        with recompute_saved(s, recompute_s, self.recompute):  # down_proj keeps a recipe for s
            return mlp.down_proj(s)


@dataclass
class Applied:
    """What `apply` switched on; `routing` says which library runs each fp32 product."""
    routing: Routing
    lean_backward: bool
    recompute: bool


def apply(model: nn.Module, onednn: bool | Literal["auto"] = "auto", lean_backward: bool = True,
          recompute: bool = True, compiled: bool = False) -> Applied:
    """Swap the speed/memory versions into `model` in place (see the module docstring).

    onednn: "auto" routes each product to the library measured faster here (model/matmul.py),
    True sends every fp32 product to oneDNN, False keeps torch's default (MKL on x86).
    compiled: the blocks are about to be torch.compile'd; lean_backward and recompute are off."""
    if compiled:
        lean_backward = recompute = False
    routing = set_routing(calibrate() if onednn == "auto" else ONEDNN if onednn else TORCH)
    for module in model.modules():
        if routing.uses_onednn() and type(module) is nn.Linear:
            module.__class__ = Linear
        elif lean_backward and type(module) is RMSNorm:
            module.__class__ = LeanRMSNorm
        elif (lean_backward or recompute) and type(module) is DecoderLayer:
            module.__class__ = LeanDecoderLayer
            module.lean_backward, module.recompute = lean_backward, recompute
    return Applied(routing, lean_backward, recompute)
