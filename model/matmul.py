"""fp32 matrix products on the CPU through oneDNN: the same arithmetic, up to twice as fast.

Why this file exists. Profiling a training step on a 2-core AMD EPYC (Zen 5) showed ~70% of the
time in `aten::mm`, running at ~220 GFLOP/s. torch hands fp32 `mm` to Intel MKL's sgemm, and MKL
does not use AVX-512 on AMD processors (MKL_VERBOSE names only a generic "Intel(R) Architecture"
target there). oneDNN, the other math library bundled with every x86 torch build (the one
`torch.compile` uses for CPU linears), dispatches on the instruction set the CPU reports and ran
the same fp32 products at ~450 GFLOP/s, the AVX-512 FMA peak of two cores:

    (tokens x in) @ (in x out)      torch.mm (MKL)    oneDNN
    2048 x 256 @ 256 x 688          222 GFLOP/s       447 GFLOP/s
    2048 x 768 @ 768 x 2048         211               455

It is still IEEE fp32: products and sums in fp32, no bf16/tf32 shortcuts; results differ from
MKL's only by summation order (~1e-6 relative). On Intel CPUs the two libraries are close.

    mm_t(a, b)          a @ b.T for 2-D tensors, no autograd (the fused loss uses it directly)
    weight_grad(g, x)   g.T @ x, a weight gradient, in the faster of two orientations
    linear(x, w)        x @ w.T with autograd; backward is two more products:
                            dx = g @ w = mm_t(g, w.T)        dw = weight_grad(g, x)
    Linear          nn.Linear whose forward is `linear`; state-dict names are unchanged

The oneDNN entry point, `torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")`
computes x @ w.T + bias; it is a private op, so it is tried once (the first time it is switched
on, never at import) against `torch.mm`, and anything unexpected (other torch version, no
oneDNN, a non-x86 machine) falls back to torch's default. It is off until `set_onednn(True)`:
model/speedups.py switches it on for training. Under autocast, in bf16/fp16, on CUDA or inside torch.compile the
default path is taken: torch already sends bf16 CPU products to oneDNN, CUDA has cuBLAS, and
the compiler picks its own GEMMs.
"""
from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def onednn_available() -> bool:
    """Whether the private oneDNN linear op works here and agrees with torch.mm (tried once)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)  # a private generator: the caller's RNG is untouched
        a, b = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
        got = torch.ops.mkldnn._linear_pointwise(a, b.t().contiguous().t(), None, "none", [], "")
        return got.shape == (5, 3) and torch.allclose(got, a @ b.t(), rtol=1e-5, atol=1e-5)
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False


_enabled = False


def set_onednn(enabled: bool) -> bool:
    """Route fp32 CPU products through oneDNN (when it works here); returns the state now in force."""
    global _enabled
    _enabled = bool(enabled) and onednn_available()
    return _enabled


def _use_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch.compile traces F.linear instead: inductor lowers linears itself (and cannot lower this op)
    return (_enabled and a.device.type == "cpu" and a.dtype == torch.float32 == b.dtype
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D a (M, K), b (N, K) -> (M, N); either may be a transposed view."""
    if _use_onednn(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.t()


def weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g.T @ x for g (M, out), x (M, in) -> (out, in), the weight gradient of a linear layer.

    oneDNN copies a transposed first operand to row-major before multiplying, so the narrower
    of the two goes first (2048 tokens, 256 -> 688: 290 vs 380 GFLOP/s, and the reverse for
    688 -> 256); (x.T @ g).T is the same matrix.
    """
    if g.shape[1] <= x.shape[1]:
        return mm_t(g.t(), x.t())
    return mm_t(x.t(), g.t()).t().contiguous()


def _mm_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ w.T -> (..., out): the leading axes folded into rows for mm_t."""
    return mm_t(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])


class _Linear(torch.autograd.Function):
    """x @ w.T whose three products all go through mm_t.

    Like autograd's own linear, it keeps only what backward needs: x only if w needs a gradient
    (a frozen LoRA base keeps no input), w only if x does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        need_x, need_w = ctx.needs_input_grad
        ctx.save_for_backward(x if need_w else None, w if need_x else None)
        ctx.x_shape = x.shape
        return _mm_rows(x, w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])                                  # (M, out)
        dx = mm_t(g2, w.t()).view(ctx.x_shape) if w is not None else None  # (M, in)
        dw = weight_grad(g2, x.reshape(-1, x.shape[-1])) if x is not None else None  # (out, in)
        return dx, dw


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with fp32 CPU products through oneDNN where that works."""
    if bias is not None or not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _Linear.apply(x, weight)
    return _mm_rows(x, weight)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) computing `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
