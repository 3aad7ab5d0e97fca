"""GGUF, the file llama.cpp, Ollama and LM Studio run, written by hand from a Hugging Face folder.

A GGUF file is one self-describing blob: the model's shape, its tokenizer and chat template as
key/value metadata, then the weights, possibly quantized. All numbers are little-endian:

    header        b"GGUF", u32 version (3), u64 tensor count, u64 metadata count
    metadata      per entry: key (string), u32 value type, value
    tensor infos  per tensor: name (string), u32 n_dims, u64 dims[n_dims], u32 ggml type,
                  u64 offset of its data counted from the start of the data section
    padding       zeros up to a multiple of the alignment (`general.alignment`, default 32)
    data          each tensor's bytes, each one starting at a multiple of the alignment

A string is a u64 byte length and UTF-8 bytes (no terminator). Value types: 0 u8, 1 i8, 2 u16,
3 i16, 4 u32, 5 i32, 6 f32, 7 bool (one byte), 8 string, 9 array (u32 item type, u64 count,
items), 10 u64, 11 i64, 12 f64. Dimensions are in GGML order, fastest-varying first, i.e. the
reverse of PyTorch's: a (rows, cols) = (out, in) weight is stored as dims [cols, rows].

Tensor types we write (block = values sharing one scale; bytes per block):
    f32 (0)   1 value, 4 bytes        f16 (1)  1 value, 2 bytes       bf16 (30)  1 value, 2 bytes
    q8_0 (8)  32 values, 34 bytes: fp16 scale d = max|x| / 127, then int8 q = round(x / d)
              (round half away from zero): 8.5 bits per weight
    q4_0 (2)  32 values, 18 bytes: fp16 scale d = m / -8 where m is the value of largest
              magnitude (with its sign, so m maps to -8 exactly), q = min(15, trunc(x / d + 8.5)),
              x ~ (q - 8) * d; 16 bytes of nibbles, value j in the low nibble of byte j and value
              j + 16 in the high nibble: 4.5 bits per weight
Both quantizers are bit-exact with the reference in llama.cpp's `gguf` Python package
(`gguf.quants`, itself matching ggml's C code): same fp32 operations in the same order, the
scale rounded to fp16 last. A quantized row must be a whole number of blocks, so a tensor whose
rows are not a multiple of 32 values cannot be stored as q8_0/q4_0: export stores such a
tensor as f16, as llama.cpp's converter does (pico-base's FFN width, 688, is one), and says so.

What llama.cpp expects, as its own converter (`convert_hf_to_gguf.py`) writes it:
* Names: `token_embd`, `blk.N.attn_q/attn_k/attn_v/attn_output`, `blk.N.attn_q_norm/attn_k_norm`
  (Qwen3), `blk.N.attn_norm`, `blk.N.ffn_gate/ffn_up/ffn_down`, `blk.N.ffn_norm`, `output_norm`,
  `output` (absent when the head is tied to the embedding: llama.cpp then reuses `token_embd`).
* 1-D tensors (norms, biases) stay f32 in every file type; the embedding and the head take the
  file's type, except in q4_0 files, where we keep them q8_0 (llama-quantize also keeps the head
  above 4 bits; the converter itself stops at q8_0).
* RoPE pairing. HF rotates dimension i with i + d/2 of each head ("rotate_half"); llama.cpp's
  `llama` architecture rotates adjacent pairs (2i, 2i + 1). So for `llama` (also Mistral) the rows
  of W_q and W_k are permuted per head: (heads, 2, d/2, in) -> (heads, d/2, 2, in). Qwen2/Qwen3 use
  the rotate_half ("NEOX") pairing in llama.cpp too, so their rows stay as they are.
* Llama-3 rope scaling is not a key but a tensor, `rope_freqs` (head_dim/2 values): the factor each
  frequency is divided by, 1 for short wavelengths, `factor` for long ones, smoothly between.
* Sliding-window attention (Mistral v0.1) has no implementation in llama.cpp's `llama`/`qwen2`
  graphs, so the file's context length is capped at the window: within it, full causal attention
  and sliding-window attention are the same computation.
The tokenizer and chat-template metadata are built in `model/gguf_vocab.py`.

Export reads the folder tensor by tensor from memory-mapped safetensors and writes each one
before reading the next, so memory stays near one tensor, not one model; the file is written
under a temporary name in the same folder and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple

import torch

from model.checkpoint import read_config
from model.cli import run_cli
from model.errors import SFTError
from model.files import atomic_file, read_json, read_text
from model.llama import Config
from model.safetensors import open_sharded

GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q4_0"]
# type name -> (ggml type id, values per block, bytes per block)
TENSOR_TYPES: dict[str, tuple[int, int, int]] = {
    "f32": (0, 1, 4), "f16": (1, 1, 2), "q4_0": (2, 32, 18), "q8_0": (8, 32, 34), "bf16": (30, 1, 2)}
TYPE_NAMES = {v[0]: k for k, v in TENSOR_TYPES.items()}
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # general.file_type (llama_ftype)
ALIGNMENT = 32
VERSION = 3
# metadata value types; a metadata entry is (type, value), an array value is (item type, items)
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FORMATS = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
                  U64: "Q", I64: "q", F64: "d"}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
CHUNK_VALUES = 1 << 22  # values encoded at a time: a 16 MB fp32 slice, whatever the tensor size


# ----------------------------------------------------------------------------- the container

def _pack(vtype: int, value) -> bytes:
    if vtype == STRING:
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return struct.pack("<Q", len(data)) + data
    if vtype == ARRAY:
        item_type, items = value
        head = struct.pack("<IQ", item_type, len(items))
        if item_type in SCALAR_FORMATS:  # one struct call for a whole numeric array
            return head + struct.pack(f"<{len(items)}{SCALAR_FORMATS[item_type]}", *items)
        return head + b"".join(_pack(item_type, item) for item in items)
    return struct.pack("<" + SCALAR_FORMATS[vtype], value)


class TensorEntry(NamedTuple):
    """A tensor to write: its GGUF name and type, PyTorch-order shape, `make()` for its values and
    `release()` to drop the source's memory-mapped pages once it is written."""
    name: str
    type: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    release: Callable[[], None] = lambda: None

    @property
    def nbytes(self) -> int:
        _, block, size = TENSOR_TYPES[self.type]
        return math.prod(self.shape) // block * size


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def write_gguf(f, metadata: dict[str, tuple[int, object]], tensors: list[TensorEntry]) -> None:
    """Write a whole GGUF file to the binary file object `f`, making one tensor at a time."""
    head = [b"GGUF", struct.pack("<IQQ", VERSION, len(tensors), len(metadata))]
    for key, (vtype, value) in metadata.items():
        head += [_pack(STRING, key), struct.pack("<I", vtype), _pack(vtype, value)]
    offset = 0
    for e in tensors:
        dims = tuple(reversed(e.shape)) or (1,)  # GGML order; a scalar is stored as one value
        head += [_pack(STRING, e.name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims),
                 struct.pack("<IQ", TENSOR_TYPES[e.type][0], offset)]
        offset = _align(offset + e.nbytes)
    blob = b"".join(head)
    f.write(blob + bytes(_align(len(blob)) - len(blob)))
    for e in tensors:
        written = 0
        for chunk in encode(e.make(), e.type):
            f.write(chunk)
            written += len(chunk)
        if written != e.nbytes:
            raise SFTError(f"tensor {e.name!r}: declared {e.shape} but produced {written} bytes, not {e.nbytes}")
        f.write(bytes(_align(written) - written))
        e.release()


class GGUFTensor(NamedTuple):
    type: str                # "q8_0", ...; the ggml id as a string for types this module does not write
    shape: tuple[int, ...]   # PyTorch order
    offset: int              # absolute position of its data in the file
    data: memoryview         # its stored bytes (empty for a type this module does not write)


class GGUFContents(NamedTuple):
    metadata: dict[str, object]
    tensors: dict[str, GGUFTensor]


def read_gguf(path: str | os.PathLike) -> GGUFContents:
    """Metadata values and tensors (memory-mapped bytes) of a GGUF file, for tests and debugging;
    `dequantize(t.data, t.type, t.shape)` gives a tensor's values."""
    path = Path(path)
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < 24:
            raise SFTError(f"{path}: too short for a GGUF header (24 bytes)")
        buf = memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(buf):
            raise SFTError(f"{path}: truncated GGUF file (ends at byte {len(buf)})")
        pos += size
        return struct.unpack_from("<" + fmt, buf, pos - size)

    def value(vtype: int):
        nonlocal pos
        if vtype == STRING:
            (n,) = take("Q")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8")
        if vtype == ARRAY:
            item_type, n = take("IQ")
            return [value(item_type) for _ in range(n)]
        if vtype not in SCALAR_FORMATS:
            raise SFTError(f"{path}: unknown metadata value type {vtype} at byte {pos - 4}")
        return take(SCALAR_FORMATS[vtype])[0]

    if bytes(buf[:4]) != b"GGUF":
        raise SFTError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, not b'GGUF')")
    pos = 4
    version, n_tensors, n_kv = take("IQQ")
    if version != VERSION:
        raise SFTError(f"{path}: GGUF version {version}; this reader knows version {VERSION}")
    metadata = {}
    for _ in range(n_kv):
        key = value(STRING)
        metadata[key] = value(take("I")[0])
    infos = []
    for _ in range(n_tensors):
        name = value(STRING)
        dims = take(f"{take('I')[0]}Q")
        ttype, offset = take("IQ")
        infos.append((name, TYPE_NAMES.get(ttype, str(ttype)), tuple(reversed(dims)), offset))
    align = metadata.get("general.alignment", ALIGNMENT)
    start = -(-pos // align) * align
    tensors = {}
    for name, ttype, shape, offset in infos:
        _, block, size = TENSOR_TYPES.get(ttype, (0, 1, 0))
        end = start + offset + math.prod(shape) // block * size
        if end > len(buf):
            raise SFTError(f"{path}: tensor {name!r} ends at byte {end}, past the end of the file (truncated?)")
        tensors[name] = GGUFTensor(ttype, shape, start + offset, buf[start + offset:end])
    return GGUFContents(metadata, tensors)


# ----------------------------------------------------------------------------- quantization

def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (0.5 -> 1, -2.5 -> -3), exactly: |x| = f + r with r in [0, 1), round up iff 2r >= 1."""
    a = x.abs()
    f = a.floor()
    return x.sign() * (f + (2 * (a - f)).floor())


def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) fp32 -> (n, 34) uint8 blocks: fp16 d, then 32 int8 codes."""
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, 0.0, 1.0 / d)  # an all-zero block: d = 0 and codes 0
    q = _round_half_away(blocks * inv).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=1)


def quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) fp32 -> (n, 18) uint8 blocks: fp16 d, then 16 bytes of 4-bit codes."""
    m = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # first largest magnitude, signed
    d = m / -8
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = ((blocks * inv) + 8.5).trunc().to(torch.uint8).clamp(max=15)  # (n, 32) codes 0..15
    return torch.cat([d.half().view(torch.uint8), q[:, :16] | (q[:, 16:] << 4)], dim=1)


def dequantize(raw: torch.Tensor | memoryview, ttype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 values of a tensor's stored bytes (any type this module writes)."""
    raw = raw if isinstance(raw, torch.Tensor) else torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if ttype in ("f32", "f16", "bf16"):
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[ttype]
        return raw.view(dtype).float().reshape(shape)
    blocks = raw.reshape(-1, TENSOR_TYPES[ttype][2])
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (n, 1)
    if ttype == "q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
    else:
        q = torch.cat([blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4], dim=1).float() - 8
    return (q * d).reshape(shape)


def encode(t: torch.Tensor, ttype: str) -> Iterator[memoryview]:
    """The bytes of `t` stored as `ttype`, a slice of rows at a time (values go through fp32 first,
    as in llama.cpp's converter, so a bf16 checkpoint rounds to f16 the same way)."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
    if rows.shape[1] % TENSOR_TYPES[ttype][1]:
        raise SFTError(f"a tensor of shape {tuple(t.shape)} cannot be stored as {ttype}: its rows of "
                       f"{rows.shape[1]} values are not a multiple of {TENSOR_TYPES[ttype][1]}")
    step = max(1, CHUNK_VALUES // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        x = rows[i:i + step].float()
        if ttype == "q8_0":
            x = quantize_q8_0(x.reshape(-1, 32))
        elif ttype == "q4_0":
            x = quantize_q4_0(x.reshape(-1, 32))
        elif ttype != "f32":
            x = x.to({"f16": torch.float16, "bf16": torch.bfloat16}[ttype])
        yield memoryview(x.contiguous().view(torch.uint8).numpy()).cast("B")


# ----------------------------------------------------------------------------- model metadata

def _architecture(hf: dict, path: Path) -> str:
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise SFTError(f"{path}: architectures {names!r} cannot be exported to GGUF "
                       f"(supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[names[0]]


def llama3_rope_factors(cfg: Config) -> torch.Tensor:
    """(head_dim/2,) fp32: what llama.cpp divides each RoPE frequency by for Llama-3 scaling,
    computed in fp32 in the same steps as llama.cpp's converter, so the tensor is bit-identical."""
    s = cfg.rope_scaling
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - lo) / (hi - lo)
    between = 1 / ((1 - smooth) / s["factor"] + smooth)
    return torch.where(wavelen < old / hi, 1.0, torch.where(wavelen > old / lo, s["factor"], between))


def model_metadata(arch: str, cfg: Config, hf: dict, path: Path) -> dict[str, tuple[int, object]]:
    """`{arch}.*` keys: the shape, attention, RoPE and norm settings llama.cpp reads."""
    context = cfg.max_position_embeddings
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if isinstance(window, int) and window < context:
        print(f"note: {path}: sliding_window={window}; llama.cpp's {arch} graph has no sliding "
              f"window, so the GGUF context length is capped at {window} (where both agree)")
        context = window
    meta = {f"{arch}.vocab_size": (U32, cfg.vocab_size), f"{arch}.context_length": (U32, context),
            f"{arch}.embedding_length": (U32, cfg.hidden_size),
            f"{arch}.feed_forward_length": (U32, cfg.intermediate_size),
            f"{arch}.block_count": (U32, cfg.num_hidden_layers),
            f"{arch}.attention.head_count": (U32, cfg.num_attention_heads),
            f"{arch}.attention.head_count_kv": (U32, cfg.num_key_value_heads),
            f"{arch}.rope.freq_base": (F32, cfg.rope_theta),
            f"{arch}.attention.layer_norm_rms_epsilon": (F32, cfg.rms_norm_eps)}
    if isinstance(window, int):
        meta[f"{arch}.attention.sliding_window"] = (U32, window)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        meta[f"{arch}.attention.key_length"] = (U32, cfg.head_dim)
        meta[f"{arch}.attention.value_length"] = (U32, cfg.head_dim)
    if arch == "llama":
        meta["llama.rope.dimension_count"] = (U32, cfg.head_dim)
    scaling = (cfg.rope_scaling or {}).get("rope_type")
    if scaling == "linear":
        meta[f"{arch}.rope.scaling.type"] = (STRING, "linear")
        meta[f"{arch}.rope.scaling.factor"] = (F32, cfg.rope_scaling["factor"])
    elif scaling == "llama3" and arch != "llama":
        raise SFTError(f"{path}: llama3 rope scaling on a {arch} model has no GGUF form (llama.cpp "
                       "reads its rope_freqs tensor only for the llama architecture)")
    return meta


def sampling_metadata(folder: Path) -> dict[str, tuple[int, object]]:
    """generation_config.json's sampling defaults, which llama.cpp's samplers start from."""
    gen = read_json(folder / "generation_config.json", default={})
    keys = {"temperature": ("general.sampling.temp", F32), "top_p": ("general.sampling.top_p", F32),
            "top_k": ("general.sampling.top_k", I32)}
    return {key: (vtype, gen[name]) for name, (key, vtype) in keys.items()
            if isinstance(gen.get(name), (int, float)) and not isinstance(gen.get(name), bool)}


# ----------------------------------------------------------------------------- tensors

def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for an HF tensor name, or None if it has none."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of W_q / W_k (or their bias) from HF's rotate_half order to llama.cpp's adjacent pairs."""
    # (heads * d, ...) -> (heads, 2, d/2, ...) -> (heads, d/2, 2, ...) -> (heads * d, ...)
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def storage_type(name: str, shape: tuple[int, ...], want: str) -> str:
    """f32 for 1-D tensors and norms; q8_0 for the embedding and head of a q4_0 file; f16 for a
    tensor whose rows are not whole blocks (as llama.cpp's converter falls back); else `want`."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return "f32"
    if want == "q4_0" and name in ("token_embd.weight", "output.weight"):
        want = "q8_0"
    return "f16" if shape[-1] % TENSOR_TYPES[want][1] else want


def plan_tensors(folder: Path, arch: str, cfg: Config, want: str) -> list[TensorEntry]:
    """Every tensor of the file, in llama.cpp's names, layout and storage types (nothing read yet)."""
    entries = []
    if arch == "llama" and (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        entries.append(TensorEntry("rope_freqs.weight", "f32", (cfg.head_dim // 2,), lambda: llama3_rope_factors(cfg)))
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    unblocked = []
    for hf_name, (f, key) in open_sharded(folder).items():
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue  # a recomputable buffer; a tied head that llama.cpp takes from token_embd
        name = gguf_name(hf_name)
        if name is None:
            raise SFTError(f"{f.path}: tensor {hf_name!r} has no GGUF name for the {arch} architecture")
        shape = tuple(f.entries[key][1])
        ttype = storage_type(name, shape, want)
        if ttype == "f16" and want != "f16" and len(shape) > 1:
            unblocked.append(hf_name)
        n_heads = heads.get(name.split(".")[2]) if arch == "llama" and name.startswith("blk.") else None

        def make(f=f, key=key, n_heads=n_heads):
            t = f.get_tensor(key)
            return permute_rope_rows(t, n_heads) if n_heads else t
        entries.append(TensorEntry(name, ttype, shape, make, lambda f=f, key=key: f.release(key)))
    if unblocked:
        print(f"note: {len(unblocked)} tensors have rows that are not a multiple of 32 values and are "
              f"stored as f16, not {want} (as llama.cpp's converter does): {', '.join(unblocked)}")
    order = {"token_embd": -2, "rope_freqs": -1, "output_norm": 1 << 30, "output": 1 << 31}
    return sorted(entries, key=lambda e: (int(e.name.split(".")[1]) if e.name.startswith("blk.")
                                          else order[e.name.split(".")[0]], e.name))


# ----------------------------------------------------------------------------- export

class ExportReport(NamedTuple):
    path: Path
    bytes: int
    n_tensors: int
    bits_per_weight: float  # tensor data bits / number of weights (metadata not counted)
    types: dict[str, int]   # storage type -> number of tensors

    def summary(self) -> str:
        types = ", ".join(f"{k} {v}" for k, v in sorted(self.types.items()))
        return (f"wrote {self.path}: {self.bytes / 1e6:.2f} MB, {self.n_tensors} tensors ({types}), "
                f"{self.bits_per_weight:.3f} bits per weight")


def export_gguf(folder: str | os.PathLike, out_path: str | os.PathLike, type: GGUFType = "q8_0",
                overwrite: bool = False, template_jinja: str | None = None) -> ExportReport:
    """Write the HF model in `folder` as one GGUF file for llama.cpp / Ollama.

    type: storage of the 2-D weights (norms and biases stay f32). template_jinja: the chat template
    to store when the model was trained with one the folder does not hold (it takes precedence
    over the folder's own template, since training decides how prompts must look).
    """
    folder, out = Path(folder), Path(out_path)
    if type not in TENSOR_TYPES:
        raise SFTError(f"GGUF type {type!r} is not one of {', '.join(TENSOR_TYPES)} (--type)")
    if out.exists() and not overwrite:
        raise SFTError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
    if not out.parent.is_dir():
        raise SFTError(f"{out.parent}: no such folder for the output file")
    from model.gguf_vocab import vocab_metadata  # it imports this module's constants
    hf = read_json(folder / "config.json", "config.json")
    arch = _architecture(hf, folder / "config.json")  # before read_config: say "cannot be exported"
    cfg = read_config(folder)  # every key checked (model/config.py)
    tensors = plan_tensors(folder, arch, cfg, type)
    metadata = {"general.architecture": (STRING, arch), "general.type": (STRING, "model"),
                "general.name": (STRING, folder.resolve().name),
                **sampling_metadata(folder), **model_metadata(arch, cfg, hf, folder / "config.json"),
                "general.file_type": (U32, FILE_TYPES[type]), "general.quantization_version": (U32, 2),
                **vocab_metadata(folder, cfg.vocab_size, template_jinja)}
    with atomic_file(out) as f:
        write_gguf(f, metadata, tensors)
    types: dict[str, int] = {}
    for e in tensors:
        types[e.type] = types.get(e.type, 0) + 1
    n_weights = sum(math.prod(e.shape) for e in tensors)
    return ExportReport(out, out.stat().st_size, len(tensors),
                        8 * sum(e.nbytes for e in tensors) / n_weights, types)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.gguf",
                                description="Export a Hugging Face model folder to one GGUF file.")
    p.add_argument("folder", help="model folder (config.json, *.safetensors, tokenizer files)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="q8_0", choices=list(TENSOR_TYPES), help="weight storage (default q8_0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--chat-template", help="a .jinja file to store as the chat template")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)

    def run() -> None:
        jinja = read_text(args.chat_template, "chat template") if args.chat_template else None
        print(export_gguf(args.folder, args.out, args.type, args.overwrite, jinja).summary())
    return run_cli(run, args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
