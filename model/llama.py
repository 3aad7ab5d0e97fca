"""A Llama-family decoder-only transformer (Llama 2/3.x, Qwen2.5, Qwen3, Mistral), read top to bottom.

Data flow for a batch of token ids `x` of shape (B, T):

    embed_tokens          (B, T) -> (B, T, D)
    N x DecoderLayer:     h = h + Attention(RMSNorm(h));  h = h + SwiGLU(RMSNorm(h))
    norm (RMSNorm)        (B, T, D)
    lm_head (Linear)      (B, T, D) -> (B, T, V) logits

The pieces, and the detail each one must get exactly right to match Hugging Face weights:

* RMSNorm: y = w * x / sqrt(mean(x^2) + eps). No mean subtraction, no bias. The statistics are
  taken in fp32 even when the model runs in bf16 (a bf16 mean of squares loses the small values),
  and the result is cast back *before* the multiplication by the weight, as HF does.
* RoPE (rotary position embedding): each query/key vector is rotated by an angle that grows with
  its position p, so q·k depends only on the distance between positions. Pair i of the head
  dimension rotates with frequency inv_freq[i] = theta^(-2i/d). HF stores the two halves of a pair
  not interleaved (x[i], x[i+1]) but split: (x[i], x[i + d/2]). The rotation then reads
      rotate(x) = x * cos + rotate_half(x) * sin,   rotate_half([a, b]) = [-b, a]
  with cos/sin = cos/sin(p * [inv_freq, inv_freq]). Using the interleaved convention on HF weights
  silently gives a worse model, not an error. Positions come from `position_ids`, so a packed row
  of several samples restarts at 0 for each sample.
* Grouped-query attention (GQA): there are fewer key/value heads than query heads; each K/V head
  is shared by `n_heads // n_kv_heads` consecutive query heads. `F.scaled_dot_product_attention`
  (a fused kernel) does the sharing itself with `enable_gqa=True`, without repeated K/V copies.
* SwiGLU MLP: down(silu(gate(x)) * up(x)).

The families differ by flags on these same modules (model/config.py reads them from config.json):
Qwen2 adds biases to the q/k/v projections; Qwen3 applies an RMSNorm (one weight of head_dim,
shared by the heads) to every head's query and key vector before RoPE, and its head_dim is free
(heads x head_dim may differ from hidden_size); Mistral lets a token attend only to itself and
the `sliding_window - 1` tokens before it; Llama-3.x ties the head to the embedding and rescales
RoPE frequencies ("llama3").

This file is the plain math. Speed and memory work for training on a CPU (oneDNN matrix
products, RMSNorm/SwiGLU backward written by hand, activations recomputed instead of stored) is
applied to a built model from outside by `model.speedups.apply(model)`, which swaps in
subclasses with the same parameters and bit-identical results; activation checkpointing and
FSDP are applied from outside too (training/distributed.py).

Masks: with no `seq_ids` the plain causal mask is used (`is_causal=True`, the fast path). With
`seq_ids` (B, T) a token attends only to earlier tokens *with the same id*: a block-diagonal causal
mask, so samples packed into one row never see each other. A sliding window cuts every band to
the last `sliding_window` positions as well (block-diagonal AND window). When every row holds a
single id and the row is no longer than the window, all of these are the plain causal mask, and
the fast path is taken (the kernel then skips the blocks above the diagonal instead of reading a
(B, 1, T, T) mask).

Generation keeps a KV cache: the keys and values of every position already processed, stored in
a buffer preallocated for the whole generation. Each new token then costs one forward over a
single position instead of re-running the whole sequence. With a sliding window the cache still
keeps every position and masks the keys that fell out of the window (see `cache_mask`). Prompts
of different lengths are left padded; padding keys are masked out and each row gets its own
positions, so a batched result is the same as generating for each prompt alone.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model.config import Config
from model.errors import SFTError
from model.sampling import sample


# ----------------------------------------------------------------------------- building blocks

def _acc(x: torch.Tensor) -> torch.dtype:
    """The dtype statistics are taken in: fp32 for fp32/bf16/fp16 inputs (fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(_acc(x))                                        # statistics in fp32
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)                       # cast back, then scale (HF's order)


def rope_inv_freq(cfg: Config, device=None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), (head_dim/2,) fp32, with linear or llama3 rescaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":  # positions divided by factor == frequencies divided by factor
        return inv / s["factor"]
    # llama3: long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the
    # band between is interpolated smoothly (Llama 3.1 "rope_scaling").
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, head_dim) for positions (B, T); computed in fp32."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim): HF's split-halves layout
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] on the last axis: the 90-degree turn of every (x[i], x[i+d/2]) pair."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class KVCache:
    """Preallocated keys/values for every layer: k[i], v[i] of shape (B, n_kv, max_len, hd).

    `length` positions are filled; `valid` (B, max_len) is False at left padding so that those
    keys are never attended to.
    """

    def __init__(self, cfg: Config, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, T, hd) at [length, length+T); return everything filled so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Causal self-attention with RoPE and GQA; the family flags add q/k/v biases (qwen2), an
    RMSNorm over each head's q and k before RoPE (qwen3) and a sliding window (mistral, via the mask)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # one weight of head_dim shared by all heads
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)  # (B, T, KV, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        if hasattr(self, "q_norm"):  # qwen3: normalise each head's vector, then rotate it
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, KV, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, KV, length+T, hd)
        rep = self.n_heads // self.n_kv
        if mask is not None and mask.dtype != q.dtype:  # under autocast q is bf16, h fp32
            mask = mask.to(q.dtype)
        # enable_gqa: SDPA reads each K/V head for its `rep` query heads in place, instead of
        # materialising (and saving for backward) rep-times repeated copies (repeat_kv)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=rep > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the gate decides, per feature, how much of up passes."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache=None, layer=0):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


def causal_mask(T: int, seq_ids: torch.Tensor | None = None, window: int | None = None,
                device=None) -> torch.Tensor | None:
    """(B or 1, 1, T, T) bool: key j visible to query i iff j <= i, i - j < window (if any) and
    seq_ids equal (if given); None when that is just the plain causal mask (the fast path)."""
    packed = seq_ids is not None and bool((seq_ids != seq_ids[:, :1]).any())
    windowed = window is not None and T > window
    if not (packed or windowed):
        return None
    i = torch.arange(T, device=device)
    dist = i[:, None] - i[None, :]  # (T, T): how far back key j lies from query i
    mask = (dist >= 0) & (dist < window) if windowed else dist >= 0
    mask = mask[None, None]
    if packed:  # same sample only; a window counted in row positions is the same within a sample
        mask = mask & (seq_ids[:, :, None] == seq_ids[:, None, :])[:, None]
    return mask


def cache_mask(cache: KVCache, T: int, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, length+T) bool for T new queries: causal, within the window, no padding keys,
    always oneself.

    The cache keeps every position and the window is a mask over it (a "masked" rather than a
    rolling cache: more memory for long generations, the same numbers). Left padding sits before
    a row's first token, so cache index distances between real tokens are position distances.
    Allowing the diagonal keeps a padding query from having zero visible keys (softmax of an
    all -inf row is NaN, and a NaN value vector poisons every row that multiplies it by 0).
    """
    end = cache.length + T
    q_idx = torch.arange(cache.length, end, device=cache.valid.device)[:, None]
    k_idx = torch.arange(end, device=cache.valid.device)[None, :]
    visible = k_idx <= q_idx
    if window is not None:
        visible = visible & (q_idx - k_idx < window)
    return (visible & cache.valid[:, None, None, :end]) | (k_idx == q_idx)


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        # _weight: the embedding skips its own N(0, 1) init; the loop below sets HF's
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # on the meta device (load_pretrained) there is nothing to initialise, and torch's
        # normal_ there would import its compiler (~2 s of every start)
        if not self.lm_head.weight.is_meta:
            for m in self.modules():  # HF's init: N(0, 0.02), biases 0
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                seq_ids: torch.Tensor | None = None, return_hidden: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or final-norm hidden states (B, T, D).

        position_ids (B, T): RoPE positions (default 0..T-1, or continuing the cache).
        seq_ids (B, T): block-diagonal causal attention between tokens with equal ids.
        cache: a KVCache to read and extend (generation); its own mask replaces seq_ids.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        window = self.config.sliding_window
        if cache is not None:
            mask = cache_mask(cache, T, window)
        else:  # None: the is_causal=True fast path (one sample per row, no window in reach)
            mask = causal_mask(T, seq_ids, window, input_ids.device)
        h = self.embed_tokens(input_ids)  # (B, T, D)
        if mask is not None:  # bool -> additive 0/-inf, once per forward (SDPA on CPU is slower with bool masks)
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(~mask, float("-inf"))
        cos, sin = rope_cos_sin(position_ids, rope_inv_freq(self.config, h.device), h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        h = self.norm(h)
        return h if return_hidden else self.lm_head(h)

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_steps(self, prompts: list[list[int]], max_new_tokens: int = 128,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       stop_ids=None, seed: int | None = None) -> Iterator[list[int | None]]:
        """Yield, per decoding step, one new token per prompt (None once that row has stopped).

        The stop token itself is reported as None. Ends when every row stopped or after
        max_new_tokens steps. This is the one decoding loop; `generate` and `stream` consume it.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise SFTError("generate: every prompt needs at least one token (e.g. BOS)")
        stop = torch.tensor(self.config.eos_ids if stop_ids is None else list(stop_ids),
                            dtype=torch.long)
        device = self.embed_tokens.weight.device
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        B, P = len(prompts), max(len(p) for p in prompts)
        lens = torch.tensor([len(p) for p in prompts], device=device)
        ids = torch.zeros(B, P, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):  # left padding: every row's last prompt token at P-1
            ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        pad = torch.arange(P, device=device)[None] < (P - lens)[:, None]  # (B, P)
        pos = (torch.arange(P, device=device)[None] - (P - lens)[:, None]).clamp(min=0)
        cache = KVCache(self.config, B, P + max_new_tokens, self.embed_tokens.weight.dtype, device)
        cache.valid[:, :P] = ~pad
        stop = stop.to(device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        x, next_pos = ids, lens.clone()
        for step in range(max_new_tokens):
            h = self(x, position_ids=pos, cache=cache, return_hidden=True)
            logits = self.lm_head(h[:, -1]).float()  # (B, V): only the last position matters
            tok = sample(logits, temperature, top_k, top_p, gen)  # (B,)
            stopped = torch.isin(tok, stop)
            yield [None if (d or s) else t for d, s, t in zip(done.tolist(), stopped.tolist(), tok.tolist())]
            done |= stopped
            if bool(done.all()):
                return
            x, pos, next_pos = tok[:, None], next_pos[:, None], next_pos + 1

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_ids=None,
                 seed: int | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """Batched generation with a KV cache; returns the new tokens of each prompt (no stop token).

        temperature 0 = greedy (argmax). stop_ids defaults to config.eos_token_id.
        on_token(row, token_id) is called for every new token as it is produced (streaming).
        """
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_steps(prompts, max_new_tokens, temperature, top_k, top_p,
                                        stop_ids, seed):
            for b, t in enumerate(step):
                if t is not None:
                    out[b].append(t)
                    if on_token is not None:
                        on_token(b, t)
        return out

    def stream(self, prompt: list[int], **kwargs) -> Iterator[int]:
        """Yield the new tokens of a single prompt one at a time (for an interactive chat).

        Takes the keyword arguments of `generate`. To print text, decode the whole reply so far
        and print the new suffix: SentencePiece drops a piece's leading space when decoded alone.
        """
        for step in self.generate_steps([prompt], **kwargs):
            if step[0] is None:
                return
            yield step[0]

    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow (or shrink) the vocabulary; new rows of the embedding and of an untied head are
        the mean of the existing rows, so new tokens start as an "average" token, not noise."""
        old = self.embed_tokens.weight
        self.embed_tokens = nn.Embedding(new_size, old.shape[1], device=old.device, dtype=old.dtype)
        _copy_rows_then_mean(self.embed_tokens.weight, old)
        head = nn.Linear(old.shape[1], new_size, bias=False, device=old.device, dtype=old.dtype)
        if self.config.tie_word_embeddings:
            head.weight = self.embed_tokens.weight
        else:
            _copy_rows_then_mean(head.weight, self.lm_head.weight)
        self.lm_head = head
        self.config.vocab_size = new_size


@torch.no_grad()
def _copy_rows_then_mean(new: torch.Tensor, old: torch.Tensor) -> None:
    n = min(new.shape[0], old.shape[0])
    new[:n] = old[:n]
    new[n:] = old.float().mean(0).to(old.dtype)
