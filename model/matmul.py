"""fp32 matrix products on the CPU: MKL or oneDNN, whichever this machine runs faster, per product.

Why this file exists. ~60% of a CPU training step is the three products of every linear layer
y = x W^T (x: (M, in) tokens, W: (out, in), g = dL/dy: (M, out)):

    forward       y  = x @ W^T      (M, in) x (in, out)
    input grad    dx = g @ W        (M, out) x (out, in)
    weight grad   dW = g^T @ x      (out, M) x (M, in): the reduction runs over the tokens

torch sends fp32 `mm` to MKL's sgemm. Every x86 torch also carries oneDNN (the library
`torch.compile` uses for CPU linears), and which of the two is faster depends on the machine:

    2 cores, 2048 tokens, 768 -> 2048           MKL (torch.mm)   oneDNN
    AMD EPYC Zen 5 (AVX-512)                    211 GFLOP/s      455     MKL runs no AVX-512 on AMD
    AMD EPYC Zen 3 (AVX2)                       125              129
    Intel Xeon family 6 model 207 (AVX-512)     ~same forward; weight grad: MKL ahead, because
                                                oneDNN copies a transposed operand first

So the library is chosen per product by measuring, not by vendor: `calibrate()` times both,
taking turns, on two layer shapes with 1024 rows (~0.5 s on 2 cores, once per machine) and
routes a product to oneDNN only where it runs at least 1.25x MKL's speed; near-ties stay on
torch's default, which also keeps the plain model's arithmetic. The choice is cached per machine
(CPU model, torch version, library caps such as ONEDNN_MAX_CPU_ISA, threads) in
~/.cache/sft-from-scratch/gemm_routing.json (or under $XDG_CACHE_HOME), so later runs skip the
timing; a measurement taken while the load average exceeds the core count serves its run but is
not cached. A cache can only make a run slower, never wrong: both libraries compute the same IEEE
fp32 products (no bf16/tf32 shortcuts), differing only by summation order (~1e-6 relative), and
an unreadable or foreign entry is measured again.

    forward_mm(x, w)     x @ w.T         for 2-D tensors, no autograd (the fused loss uses these)
    input_grad_mm(g, w)  g @ w
    weight_grad(g, x)    g.T @ x
    linear(x, w)         x @ w.T with autograd, its three products routed as above
    Linear               nn.Linear computing `linear`; state-dict names are unchanged

The oneDNN entry point, `torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")`
computes a @ b.T + bias; it is a private op, so it is tried once (never at import) against
torch.mm, and anything unexpected (other torch version, no oneDNN, a non-x86 machine) keeps
torch's default. Under autocast, in bf16/fp16, on CUDA or inside torch.compile the default path
is always taken: torch already sends bf16 CPU products to oneDNN, CUDA has cuBLAS, and the
compiler picks its own GEMMs. The routing is process-wide (`set_routing`); model/speedups.py
sets it for training.
"""
from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.errors import SFTError
from model.files import atomic_write_json, read_json

Lib = Literal["torch", "onednn"]


@dataclass(frozen=True)
class Routing:
    """Which library runs each product of a linear layer (fp32, CPU)."""
    forward: Lib = "torch"
    input_grad: Lib = "torch"
    weight_grad: Lib = "torch"

    def uses_onednn(self) -> bool:
        return "onednn" in (self.forward, self.input_grad, self.weight_grad)


TORCH = Routing()
ONEDNN = Routing("onednn", "onednn", "onednn")


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


_routing = TORCH


def set_routing(routing: Routing) -> Routing:
    """Route fp32 CPU products as `routing` says (oneDNN only where it works here); returns the
    routing now in force."""
    global _routing
    _routing = routing if not routing.uses_onednn() or onednn_available() else TORCH
    return _routing


def _onednn(a: torch.Tensor, b: torch.Tensor, lib: Lib) -> bool:
    # torch.compile traces F.linear instead: inductor lowers linears itself (and cannot lower this op)
    return (lib == "onednn" and a.device.type == "cpu" and a.dtype == torch.float32 == b.dtype
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _mm_t(a: torch.Tensor, b: torch.Tensor, lib: Lib) -> torch.Tensor:
    """a @ b.T for 2-D a (M, K), b (N, K) -> (M, N) through `lib`; either may be a transposed view."""
    if _onednn(a, b, lib):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.t()


def forward_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, in) @ w.T, w (out, in) -> (M, out)."""
    return _mm_t(x, w, _routing.forward)


def input_grad_mm(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g (M, out) @ w (out, in) -> (M, in)."""
    return _mm_t(g, w.t(), _routing.input_grad)


def weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g.T @ x for g (M, out), x (M, in) -> (out, in), the weight gradient of a linear layer.

    MKL reads a transposed operand in place. oneDNN copies a transposed first operand to
    row-major before multiplying, and (x.T @ g).T is the same matrix, so it gets the order that
    copies less: g.T first copies M x out values; x.T first copies M x in, and the (in, out)
    result once more to hand back (out, in) row-major (Zen 5, 2048 tokens: 256 -> 688 runs at
    380 GFLOP/s x-first vs 290 g-first; the loss head, out = 32000 vocabulary rows, g-first).
    """
    if not _onednn(g, x, _routing.weight_grad):
        return g.t() @ x
    m, out, inp = g.shape[0], g.shape[1], x.shape[1]
    if m * out <= m * inp + out * inp:
        return _mm_t(g.t(), x.t(), "onednn")
    return _mm_t(x.t(), g.t(), "onednn").t().contiguous()


def _mm_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ w.T -> (..., out): the leading axes folded into rows for forward_mm."""
    return forward_mm(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])


class _Linear(torch.autograd.Function):
    """x @ w.T whose three products are routed per product.

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
        g2 = g.reshape(-1, g.shape[-1])                                     # (M, out)
        dx = input_grad_mm(g2, w).view(ctx.x_shape) if w is not None else None  # (M, in)
        dw = weight_grad(g2, x.reshape(-1, x.shape[-1])) if x is not None else None  # (out, in)
        return dx, dw


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with fp32 CPU products routed as `set_routing` chose."""
    if bias is not None or not _routing.uses_onednn() or not _onednn(x, weight, "onednn"):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _Linear.apply(x, weight)
    return _mm_rows(x, weight)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) computing `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------- calibration

# (tokens, in, out): a small and a large layer, 3.6 GFLOP per pass. The row count matters: with
# 256 rows, 2 threads, this Intel machine ran oneDNN's forward 1.5x MKL's; with 1024-2048 rows,
# as training runs, 0.9-1.2x
CALIBRATION_SHAPES = ((1024, 256, 688), (1024, 768, 2048))
ONEDNN_MARGIN = 0.8  # oneDNN must run >= 1.25x MKL's speed: near-ties keep torch's default
_PRODUCTS: dict[str, Callable] = {"forward": lambda x, w, g: forward_mm(x, w),
                                   "input_grad": lambda x, w, g: input_grad_mm(g, w),
                                   "weight_grad": lambda x, w, g: weight_grad(g, x)}


def measure_products(reps: int = 3) -> dict[str, float]:
    """Per product, how many times faster oneDNN runs it than MKL over CALIBRATION_SHAPES: the
    median over `reps` passes in which the two take turns (so that load from elsewhere hits
    both alike) of t_mkl / t_onednn."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen),
               torch.randn(m, n, generator=gen)) for m, k, n in CALIBRATION_SHAPES]
    ratios: dict[str, list[float]] = {p: [] for p in _PRODUCTS}
    before = _routing
    try:
        for rep in range(reps + 1):  # the first pass warms up (oneDNN builds its kernels)
            for product, run in _PRODUCTS.items():
                took = {}
                for lib in ("torch", "onednn") if rep % 2 else ("onednn", "torch"):
                    set_routing(Routing(**{product: lib}))
                    t0 = time.perf_counter()
                    for x, w, g in shapes:
                        run(x, w, g)
                    took[lib] = time.perf_counter() - t0
                if rep:
                    ratios[product].append(took["torch"] / took["onednn"])
    finally:
        set_routing(before)
    return {p: statistics.median(r) for p, r in ratios.items()}


def routing_from(speedup: dict[str, float]) -> Routing:
    """oneDNN for a product only where it runs at least 1/ONEDNN_MARGIN times MKL's speed."""
    return Routing(**{p: "onednn" if r * ONEDNN_MARGIN >= 1.0 else "torch" for p, r in speedup.items()})


def machine_key() -> str:
    """What the measurement depends on: CPU, torch (and its libraries), their caps, threads."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        cpu = platform.processor() or "?"
    caps = ",".join(f"{k}={os.environ[k]}" for k in
                    ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
                     "MKL_DEBUG_CPU_TYPE") if k in os.environ)
    return (f"{cpu} | {platform.machine()} | torch {torch.__version__} | {caps or 'no caps'} | "
            f"{torch.get_num_threads()} threads")


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sft-from-scratch" / "gemm_routing.json"


def _read_cache(path: Path) -> dict:
    try:
        cache = read_json(path, "GEMM routing cache", default={})
    except SFTError:  # a torn or foreign file: measure again, then overwrite it
        return {}
    return cache if isinstance(cache, dict) else {}


def _from_cache(entry) -> Routing | None:
    try:
        routing = Routing(**entry["routing"])
    except (TypeError, KeyError):
        return None
    return routing if all(lib in ("torch", "onednn") for lib in asdict(routing).values()) else None


_calibrated: dict[str, Routing] = {}  # per machine key: one measurement per process at most


def calibrate(use_cache: bool = True) -> Routing:
    """This machine's routing: measured once per process, or read from the cache file (and
    written there after measuring) when `use_cache`."""
    if not onednn_available():
        return TORCH
    key, path = machine_key(), cache_file()
    if key in _calibrated:
        return _calibrated[key]
    cache = _read_cache(path) if use_cache else {}
    routing = _from_cache(cache.get(key, {}))
    if routing is None:
        speedup = measure_products()
        routing = routing_from(speedup)
        # a measurement taken while other work held the cores serves this run but is not kept
        if use_cache and os.getloadavg()[0] < (os.cpu_count() or 1):
            cache[key] = {"routing": asdict(routing),
                          "onednn_speedup": {p: round(r, 3) for p, r in speedup.items()}}
            try:
                atomic_write_json(path, cache)
            except SFTError:  # a read-only home: measure again next time
                pass
    _calibrated[key] = routing
    return routing
