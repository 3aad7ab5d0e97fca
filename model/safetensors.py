"""The safetensors file format, read and written by hand.

A `.safetensors` file is three parts:

    [ 8 bytes: N, little-endian u64 ][ N bytes: JSON header ][ data: raw little-endian bytes ]

The header maps each tensor name to {"dtype": "F32", "shape": [rows, cols],
"data_offsets": [begin, end]}, offsets counted from the start of the data part, plus an optional
"__metadata__" dict of strings (transformers writes {"format": "pt"}). There is no pickle, so
reading a file can never run code, and since every tensor is a plain byte range we can
memory-map the file and hand out tensors that are views into it: nothing is read from disk until
a tensor is used, which is how a loader keeps its peak memory near one copy of the weights.

The file is untrusted input, so every bound is checked before it is used: the header length
against a cap and the file size (a corrupt length must not make us allocate 2^64 bytes), each
dtype, each shape x itemsize against its byte range, and the ranges themselves, which must
tile the data part exactly: start at 0, no gaps, no overlaps, end at the end of the file.

Sharded checkpoints split the tensors over several files and add `model.safetensors.index.json`:
{"metadata": {"total_size": bytes}, "weight_map": {tensor name: file name}}.

Writing streams. The header holds every offset, so it needs only each tensor's shape and dtype,
not its values: a `LazyTensor(shape, dtype, make)` stands for a tensor that `make()` produces
when its bytes are due. The writer lays out the header from shapes alone, then makes, writes and
drops one tensor at a time, so exporting a model whose weights must be computed (a QLoRA model
merged on the way out: dequantize + LoRA update) holds one finished tensor at a time, never the
whole model. Plain tensors go through the same path (a LazyTensor that returns the tensor).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from model.errors import SFTError
from model.files import atomic_file, atomic_write_json, read_json

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's cap
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise KeyError(k)
        out[k] = v
    return out


def _parse_header(path: Path, file_size: int, head: bytes) -> tuple[int, dict, dict]:
    """Validate the header; return (data start, {name: (dtype, shape, begin, end)}, metadata)."""
    if file_size < 8:
        raise SFTError(f"{path}: truncated safetensors file ({file_size} bytes, needs >= 8)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES:
        raise SFTError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap (corrupt file?)")
    if 8 + n > file_size:
        raise SFTError(f"{path}: header length {n} is larger than the file ({file_size} bytes): truncated?")
    try:
        header = json.loads(head[8:8 + n], object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SFTError(f"{path}: header is not valid JSON ({e})") from None
    except KeyError as e:
        raise SFTError(f"{path}: header names tensor {e.args[0]!r} twice") from None
    if not isinstance(header, dict):
        raise SFTError(f"{path}: header must be a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SFTError(f"{path}: __metadata__ must map strings to strings")
    data_len = file_size - 8 - n
    entries = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) < {"dtype", "shape", "data_offsets"}:
            raise SFTError(f"{where}: entry needs dtype, shape and data_offsets")
        if info["dtype"] not in DTYPES:
            raise SFTError(f"{where}: unknown dtype {info['dtype']!r} (known: {', '.join(DTYPES)})")
        dtype, shape, offs = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise SFTError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_len):
            raise SFTError(f"{where}: data_offsets {offs!r} out of range 0..{data_len} (truncated file?)")
        nbytes = math.prod(shape) * dtype.itemsize
        if offs[1] - offs[0] != nbytes:
            raise SFTError(f"{where}: shape {shape} of {info['dtype']} needs {nbytes} bytes, "
                           f"data_offsets give {offs[1] - offs[0]}")
        entries[name] = (dtype, shape, offs[0], offs[1])
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            raise SFTError(f"{path}: tensor {name!r} at bytes {begin}..{end} overlaps the previous tensor")
        if begin > pos:
            raise SFTError(f"{path}: gap of unused bytes {pos}..{begin} before tensor {name!r}")
        pos = end
    if pos != data_len:
        raise SFTError(f"{path}: {data_len - pos} trailing bytes after the last tensor (corrupt file?)")
    return 8 + n, entries, meta


class SafeFile:
    """Lazy reader for one file, like `safetensors.safe_open`: keys(), get_tensor(name), metadata.

    The file is memory-mapped copy-on-write: tensors are views into the mapping (no read until
    touched), and writing to one changes only this process's copy, never the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) == 8:
                    (n,) = struct.unpack("<Q", head)
                    if n <= MAX_HEADER_BYTES and 8 + n <= size:
                        head += f.read(n)
                self.data_start, self.entries, self.metadata = _parse_header(self.path, size, head)
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        except OSError as e:
            raise SFTError(f"{self.path}: cannot read ({e.strerror})") from None

    def __enter__(self) -> "SafeFile":
        return self

    def __exit__(self, *exc) -> None:
        self._mm = None  # tensors still alive keep the mapping open; it closes with the last one

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise SFTError(f"{self.path}: no tensor named {name!r}")
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        offset = self.data_start + begin
        if offset % dtype.itemsize:  # misaligned view: copy the bytes instead
            raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - begin, offset=offset)
            return raw.clone().view(dtype).reshape(shape)
        return torch.frombuffer(self._mm, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=offset).reshape(shape)

    def release(self, name: str, lo: int = 0, hi: int | None = None) -> None:
        """Drop bytes [lo, hi) of tensor `name` from memory once copied elsewhere (loader use).

        Pages of a private mapping that were never written are simply read again from the file
        if touched later, so rounding the range out to whole pages is harmless.
        """
        _, _, begin, end = self.entries[name]
        page = mmap.PAGESIZE
        lo = (self.data_start + begin + lo) // page * page
        hi = -(-(self.data_start + (end if hi is None else begin + hi)) // page) * page
        if self._mm is not None and hasattr(self._mm, "madvise") and hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(self._mm)) - lo)


def load_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one file as lazy memory-mapped views."""
    f = SafeFile(path)
    return {name: f.get_tensor(name) for name in f.keys()}


class LazyTensor(NamedTuple):
    """A tensor known by shape and dtype now, produced by `make()` only when it is written."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _lazy(t: torch.Tensor | LazyTensor) -> LazyTensor:
    return t if isinstance(t, LazyTensor) else LazyTensor(tuple(t.shape), t.dtype, lambda: t)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _write_one(f, name: str, spec: LazyTensor, path: Path) -> None:
    """Make one tensor, check it against the header already written, write it; the caller keeps
    no reference, so it is freed before the next one is made."""
    t = spec.make()
    if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
        raise SFTError(f"{path}: tensor {name!r} was declared {tuple(spec.shape)} {spec.dtype} but "
                       f"produced {tuple(t.shape)} {t.dtype}")
    f.write(_tensor_bytes(t))


def save_file(tensors: dict[str, torch.Tensor | LazyTensor], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (tensors or LazyTensors, made one at a time) to `path` atomically
    (temp file in the same folder, then rename).

    Tensors are laid out largest itemsize first so every one is aligned to its element size
    (the header is padded with spaces to a multiple of 8 bytes).
    """
    path = Path(path)
    specs = {name: _lazy(t) for name, t in tensors.items()}
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    order = sorted(specs, key=lambda k: (-specs[k].dtype.itemsize, k))
    pos = 0
    for name in order:
        spec = specs[name]
        if spec.dtype not in DTYPE_NAMES:
            raise SFTError(f"{path}: cannot store tensor {name!r} of dtype {spec.dtype}")
        header[name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [pos, pos + spec.nbytes]}
        pos += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in order:
            _write_one(f, name, specs[name], path)


def save_sharded(tensors: dict[str, torch.Tensor | LazyTensor], folder: str | os.PathLike,
                 max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Write `model.safetensors`, or when the tensors exceed max_shard_bytes, shards
    `model-0000i-of-0000n.safetensors` filled in order plus the index. Returns the file names.

    A tensor is never split, so one larger than max_shard_bytes gets a shard of its own.
    LazyTensors are made one at a time as their shard is written (see save_file).
    """
    folder = Path(folder)
    specs = {name: _lazy(t) for name, t in tensors.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, spec in specs.items():
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += spec.nbytes
    if len(shards) == 1:
        save_file(specs, folder / SINGLE_NAME)
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, keys in zip(names, shards):
        save_file({k: specs[k] for k in keys}, folder / fname)
        weight_map.update({k: fname for k in keys})
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs.values())}, "weight_map": weight_map}
    atomic_write_json(folder / INDEX_NAME, index)
    return names + [INDEX_NAME]


def open_sharded(folder: str | os.PathLike) -> dict[str, tuple[SafeFile, str]]:
    """Map every tensor name of a folder to (its SafeFile, name), from the index or the single file."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        if not (folder / SINGLE_NAME).exists():
            raise SFTError(f"{folder}: neither {SINGLE_NAME} nor {INDEX_NAME} found")
        f = SafeFile(folder / SINGLE_NAME)
        return {k: (f, k) for k in f.keys()}
    try:
        weight_map = read_json(index_path, "safetensors index")["weight_map"]
    except (KeyError, TypeError) as e:
        raise SFTError(f"{index_path}: not a valid index (needs a 'weight_map' object): {e}") from None
    files: dict[str, SafeFile] = {}
    out = {}
    for name, fname in weight_map.items():
        if fname not in files:
            if not (folder / fname).exists():
                raise SFTError(f"{index_path}: shard {fname!r} (holding {name!r}) is missing")
            files[fname] = SafeFile(folder / fname)
        if name not in files[fname].entries:
            raise SFTError(f"{index_path}: tensor {name!r} is not in shard {fname!r}")
        out[name] = (files[fname], name)
    return out


def load_sharded(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) folder as lazy memory-mapped views."""
    return {name: f.get_tensor(key) for name, (f, key) in open_sharded(folder).items()}
