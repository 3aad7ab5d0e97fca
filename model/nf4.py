"""NF4: 4-bit NormalFloat weights with double-quantized scales, as in QLoRA / bitsandbytes.

Why the 16 levels are normal quantiles
--------------------------------------
A pretrained weight matrix is close to normally distributed. Cut it into blocks of 64 values
and divide each block by its largest magnitude (its *absmax*): every value now lies in [-1, 1]
and, block after block, they follow (roughly) the same bell curve. The best 4-bit code for such
values gives every one of its 16 levels the same share of the probability mass, so each code is
used equally often and no bits are wasted on empty tails. Those levels are quantiles of N(0, 1):
bitsandbytes takes 8 quantiles on the positive side and 7 on the negative side of the normal
inverse CDF between probabilities 0.5 and 0.9677 (so that the extreme quantile maps to +-1 after
normalising), adds an exact 0 (padding and zero weights stay exact) and divides by the largest.
The asymmetry (8 positive, 7 negative, plus 0) is what lets 16 codes contain an exact zero.
A weight w in a block with absmax m is stored as the index of the nearest level to w / m;
it comes back as m * NF4[index]. The error of one value is at most m times half the widest gap
between neighbouring levels (|-1 - (-0.696)| / 2 = 0.152).

Where 4.127 bits per parameter comes from
-----------------------------------------
Each weight costs a 4-bit index (two per byte: the first of a pair in the HIGH nibble, as in
bitsandbytes). Each block of 64 also stores its absmax; in fp32 that is 32 / 64 = 0.5 bit per
weight, so plain NF4 costs 4 + 32/64 = 4.5 bits. *Double quantization* compresses the absmax
values themselves: subtract their mean (they are all positive, so centring uses the whole signed
8-bit range), then quantize them 8-bit block-wise with bitsandbytes' *dynamic* code (a signed
float-like 256-level map, finer near 0) in blocks of 256, keeping one fp32 absmax per 256 blocks.
Per weight that is 8/64 + 32/(64*256) = 0.125 + 0.002 = 0.127 bit, total ~= 4.127 bits/param
(plus one fp32 mean per tensor, negligible).

The 4-bit linear layer
----------------------
`Linear4bit` keeps only the packed codes and the quantized scales. Its forward dequantizes the
weight on the fly inside a custom autograd.Function that saves only those packed tensors, so
backward dequantizes again instead of keeping an (out, in) full-precision copy alive until the
backward pass: that copy, for every layer at once, is exactly the memory QLoRA exists to avoid.
Only the input gets a gradient; the 4-bit weight is frozen (LoRA trains next to it).

Rounding follows bitsandbytes' reference PyTorch kernels (backends/default/ops.py, the same
decisions as its CUDA kernels) bit for bit; tests/parity/test_nf4_parity.py checks it. Every
value is multiplied by the reciprocal of its block absmax, clamped to [-1, 1] and bucketed
against the midpoints between neighbouring levels (exactly on a midpoint -> the lower level).
(bitsandbytes' native CPU library rounds the 8-bit scales with an approximate binary search and
picks the other neighbour for a few values per thousand; the 4-bit codes are the same.)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.matmul import linear

# bitsandbytes' NF4 code book (functional.get_4bit_type("nf4")), exact fp32 values, ascending.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
NF4_ZERO = 7            # index of the level 0.0
BLOCKSIZE = 64          # weights per absmax (QLoRA)
DQ_BLOCKSIZE = 256      # absmax values per second-level fp32 scale (double quantization)
_CHUNK = 1 << 22        # elements quantized at once: bounds temporaries for 7B-sized matrices


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (create_dynamic_map(True, 7, 8)): 256 sorted values.

    For exponent i = 0..6 it holds 2**i evenly spaced magnitudes between 0.1 and 1 times 10**(i-6)
    (so tiny values get their own decade), both signs, plus 0 and 1: 2 * 127 + 2 = 256 levels.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()
DYNAMIC_MIDPOINTS = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2


# --------------------------------------------------------------------------- block-wise rounding
def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D float tensor -> (values scaled into [-1, 1] by their block's absmax, fp32 absmax).

    bitsandbytes' reference kernel: multiply by 1/absmax (the last partial block divides),
    clamp to [-1, 1]. The caller then picks the nearest code through the midpoints between
    sorted codes (a value exactly on a midpoint takes the lower code).
    """
    flat = flat.float()
    full = flat.numel() - flat.numel() % blocksize
    blocks = flat[:full].view(-1, blocksize)                               # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).view(-1)
    if full < flat.numel():                                                # last partial block
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


def _nf4_index(scaled: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level = how many midpoints lie strictly below the value.

    Same result as torch.bucketize(scaled, NF4_MIDPOINTS), but 15 vectorised comparisons are
    ~3x faster on CPU than a per-element binary search (it matters for a 7B model).
    """
    idx = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for m in NF4_MIDPOINTS.tolist():
        idx += scaled > m
    return idx


# --------------------------------------------------------------------------- 4-bit weights
def quantize_nf4(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (any shape, float) -> (packed uint8 codes (ceil(n/2),), fp32 absmax (n_blocks,)).

    A last partial block gets its own absmax, and an odd element count is padded with one 0
    code, as bitsandbytes does. Works in chunks so a 7B-sized matrix needs little scratch memory.
    """
    flat = weight.detach().reshape(-1)
    chunk = _CHUNK - _CHUNK % blocksize
    packed, absmax = [], []
    for start in range(0, flat.numel(), chunk):
        scaled, amax = _blockwise_scale(flat[start:start + chunk], blocksize)
        idx = _nf4_index(scaled)
        if idx.numel() % 2:
            idx = torch.nn.functional.pad(idx, (0, 1), value=NF4_ZERO)   # pad code = exact 0
        packed.append((idx[0::2] << 4) | idx[1::2])                        # first of a pair: high nibble
        absmax.append(amax)
    return torch.cat(packed), torch.cat(absmax)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                   blocksize: int = BLOCKSIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed codes + fp32 absmax -> tensor of `shape` in `dtype` (code * absmax computed in fp32)."""
    n = math.prod(shape)
    # one lookup per byte: entry b of the table is the fp32 pair (NF4[b >> 4], NF4[b & 15]),
    # viewed as one int64 so that a 1-D index_select (the fastest CPU gather) fetches both
    pairs = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)   # (256, 2)
    table = pairs.to(packed.device).view(torch.int64).view(-1)                           # (256,)
    values = torch.index_select(table, 0, packed.int()).view(torch.float32)[:n]          # (n,) fresh
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[:full // blocksize, None])
    if full < n:                                                          # last partial block
        values[full:].mul_(absmax[-1])
    return values.to(dtype).view(shape)


# --------------------------------------------------------------------------- 8-bit scales
def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D float tensor -> (uint8 indices into DYNAMIC_CODE, fp32 absmax per block)."""
    scaled, absmax = _blockwise_scale(x.reshape(-1), blocksize)
    return torch.bucketize(scaled, DYNAMIC_MIDPOINTS.to(x.device)).to(torch.uint8), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """Inverse of quantize_blockwise_8bit: code[q] * absmax of its block, fp32."""
    values = DYNAMIC_CODE.to(q.device)[q.long()]
    return values * absmax.repeat_interleave(blocksize)[: q.numel()]


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax -> (uint8 codes, fp32 scale per 256 codes, fp32 mean offset)."""
    offset = absmax.mean()
    q, scale = quantize_blockwise_8bit(absmax - offset)
    return q, scale, offset


def double_dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return dequantize_blockwise_8bit(q, scale) + offset


# --------------------------------------------------------------------------- the layer
class _NF4Linear(torch.autograd.Function):
    """y = x @ W^T with W dequantized in forward AND again in backward; only packed data is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "Linear4bit") -> torch.Tensor:
        ctx.module = module
        ctx.save_for_backward(*module.quant_buffers())   # uint8 only: codes, scales as raw bytes
        return linear(x, module.dequantize(x.dtype))              # x @ W^T (no grad in here)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.module.dequantize_from(*ctx.saved_tensors, dtype=grad_out.dtype)
        return linear(grad_out, weight.t()), None         # (..., out) @ (out, in) -> (..., in)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # fp32 scales live as raw bytes so that model.to(torch.bfloat16) cannot round them
    return t.detach().float().contiguous().reshape(-1).view(torch.uint8).clone()


def _from_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float32)


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (optionally double-quantized).

    Buffers: `weight_nf4` (ceil(out*in/2),) uint8 packed codes; with double quantization
    `absmax_q` (n_blocks,) uint8 + `absmax_scale`, `absmax_offset` (fp32 as bytes), otherwise
    `absmax` (fp32 as bytes). Forward runs in `compute_dtype` and returns the input's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32, double_quant: bool = True,
                 blocksize: int = BLOCKSIZE):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype, self.double_quant, self.blocksize = compute_dtype, double_quant, blocksize
        packed, absmax = quantize_nf4(weight, blocksize)
        self.register_buffer("weight_nf4", packed)
        if double_quant:
            q, scale, offset = double_quantize(absmax)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax_scale", _as_bytes(scale))
            self.register_buffer("absmax_offset", _as_bytes(offset))
        else:
            self.register_buffer("absmax", _as_bytes(absmax))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32,
                    double_quant: bool = True) -> "Linear4bit":
        return cls(linear.weight, linear.bias, compute_dtype, double_quant)

    def quant_buffers(self) -> tuple[torch.Tensor, ...]:
        if self.double_quant:
            return self.weight_nf4, self.absmax_q, self.absmax_scale, self.absmax_offset
        return self.weight_nf4, self.absmax

    def dequantize_from(self, packed: torch.Tensor, *scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.double_quant:
            q, scale, offset = scales
            absmax = double_dequantize(q, _from_bytes(scale), _from_bytes(offset))
        else:
            absmax = _from_bytes(scales[0])
        return dequantize_nf4(packed, absmax, (self.out_features, self.in_features), self.blocksize, dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight in `dtype` (default: compute dtype). A fresh tensor each call."""
        return self.dequantize_from(*self.quant_buffers(), dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Linear.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (for merging / exporting)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight_nf4.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(torch.float32))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def storage_bits(self) -> int:
        return sum(b.numel() * b.element_size() * 8 for b in self.quant_buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"compute_dtype={self.compute_dtype}, double_quant={self.double_quant}")


# --------------------------------------------------------------------------- whole models
def _default_skip(name: str) -> bool:
    # the head (often tied to the embedding) stays in full precision, as in QLoRA / bitsandbytes
    return name.split(".")[-1] == "lm_head"


def quantize_model_linears(model: nn.Module, compute_dtype: torch.dtype = torch.float32,
                           double_quant: bool = True, skip=_default_skip) -> nn.Module:
    """Replace every nn.Linear (except those `skip(name)` keeps, default lm_head) by Linear4bit.

    Each layer is quantized and its full-precision weight dropped before the next one, so the
    peak is the model plus one layer, not two models.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not skip(full):
                setattr(module, child_name, Linear4bit.from_linear(child, compute_dtype, double_quant))
    return model


def nf4_linear_hook(compute_dtype: torch.dtype = torch.float32, double_quant: bool = True, skip=_default_skip):
    """A `linear_hook(name, weight) -> nn.Module | None` for model.checkpoint.load_pretrained.

    The loader calls it with each linear weight as it is read from disk; the weight is quantized
    right there, so a full-precision copy of the whole model never exists.
    """
    def hook(name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module | None:
        module_name = name[: -len(".weight")] if name.endswith(".weight") else name
        if skip(module_name):
            return None
        return Linear4bit(weight, bias, compute_dtype, double_quant)
    return hook


def nf4_bits_per_param(model: nn.Module) -> float:
    """Storage bits per quantized parameter over all Linear4bit layers of `model`."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    n = sum(m.in_features * m.out_features for m in layers)
    return sum(m.storage_bits() for m in layers) / max(n, 1)


def load_quantized(folder, compute_dtype: torch.dtype = torch.bfloat16, device="cpu",
                   double_quant: bool = True) -> nn.Module:
    """QLoRA's base model: an HF folder loaded with every linear but lm_head in NF4.

    Embeddings, norms and the head are kept in `compute_dtype`; each linear weight is converted
    to `compute_dtype` and quantized the moment it is read.
    """
    from model.checkpoint import load_pretrained   # here, so model.checkpoint never depends on us
    return load_pretrained(folder, dtype=compute_dtype, device=device,
                           linear_hook=nf4_linear_hook(compute_dtype, double_quant))
