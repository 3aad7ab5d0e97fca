"""The tokenized cache: a data file is tokenized once, then memory-mapped by every later run.

Tokenizing a million conversations takes minutes; reading back its arrays takes a moment. So
the `Tokenized` arrays of each data file (data/pipeline.py) are written as numpy files

    <cache_dir>/<source name>-<key>/{input_ids,trained,offsets,conversation,trainable}.npy meta.json

and a later run, a resumed run and every rank of a torchrun job map them with
`np.load(mmap_mode="r")`: nothing is copied until it is touched, and the pages are shared.

The key is a hash of everything that changes those arrays (`cache_key`):
    the data file     its size, modification time and a SHA-256 of its first and last MiB
                      (data.cache_hash = "quick"), or of every byte ("full")
    how it is read    format, max_records, the source's system prompt
    the tokenizer     a SHA-256 of each tokenizer file of the model folder
    the masking       template name, loss_on, train_on_reasoning, max_seq_len
    CODE_VERSION      raised whenever this code would produce different arrays
so changing any of them makes a new entry, never a stale hit. (Mixture weights, temperature,
held-out share and seed are applied after the cache: changing them re-uses it.)

Trust, but check. meta.json records the key, each array's shape, dtype and CRC-32 and the file's
counts; an entry is used only if all of it matches. A truncated array, a flipped byte, a missing
file or an entry from another code version is rebuilt with a one-line notice, never used. Writes
go through model/files.atomic_file (temporary file + rename), meta.json last: an entry without
meta.json is incomplete, and two processes that build the same entry at once write identical
bytes, so whichever rename lands last is as good as the other.

Clearing it: delete the folder (`rm -r <run.out_dir>/.cache/data`, or your data.cache_dir);
entries of old settings are never read again and can go at any time.
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data.pipeline import Masking, Tokenized, Workers, tokenize_file
from data.sources import DataFile
from model.errors import SFTError
from model.files import atomic_file, atomic_write_json, read_json

CODE_VERSION = 1
ARRAYS = {"input_ids": np.int32, "trained": np.bool_, "offsets": np.int64, "conversation": np.int32,
          "trainable": np.int32}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
MIB = 1 << 20


def _sha256_file(path: Path, full: bool) -> str:
    """SHA-256 of a file's bytes, or (full=False) of its first and last MiB only."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if full:
            while block := f.read(8 * MIB):
                h.update(block)
        else:
            h.update(f.read(MIB))
            size = f.seek(0, 2)
            f.seek(max(MIB, size - MIB))
            h.update(f.read(MIB))
    return h.hexdigest()


def file_fingerprint(path: Path, full: bool = False) -> dict:
    """What identifies a data file's contents: size, modification time, a hash (see above)."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(path, full),
            "hashed": "all" if full else "first and last MiB"}


def tokenizer_fingerprint(model_dir: str | Path) -> dict:
    """SHA-256 of each tokenizer file of a model folder."""
    folder = Path(model_dir)
    return {name: _sha256_file(folder / name, True) for name in TOKENIZER_FILES if (folder / name).is_file()}


def cache_key(file: DataFile, masking: Masking, tokenizer: dict, full_hash: bool = False) -> dict:
    """Everything that changes a file's tokenized arrays (the module docstring lists it)."""
    return {"code_version": CODE_VERSION, "file": file_fingerprint(file.path, full_hash), "format": file.format,
            "max_records": file.max_records, "system": file.system, "template": file.template,
            "loss_on": masking.loss_on, "train_on_reasoning": masking.train_on_reasoning,
            "max_seq_len": masking.max_seq_len, "tokenizer": tokenizer}


def entry_folder(cache_dir: Path, name: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:60]}-{digest}"


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


def save(folder: Path, tok: Tokenized, key: dict) -> None:
    """Write an entry: the arrays, then meta.json (see the module docstring)."""
    files = {}
    for name, dtype in ARRAYS.items():
        a = np.ascontiguousarray(getattr(tok, name), dtype=dtype)
        with atomic_file(folder / f"{name}.npy") as f:
            np.save(f, a, allow_pickle=False)
        files[name] = {"shape": list(a.shape), "dtype": a.dtype.str, "crc32": _crc(a)}
    atomic_write_json(folder / "meta.json", {"code_version": CODE_VERSION, "key": key, "files": files,
                                             "stats": tok.stats})


class Loaded(NamedTuple):
    tokenized: Tokenized | None
    problem: str | None      # why an existing entry was not used (None: used, or no entry at all)


def load(folder: Path, key: dict) -> Loaded:
    """The entry's arrays, memory-mapped, if it is complete and intact."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return Loaded(None, "incomplete (no meta.json)" if folder.exists() else None)
    try:
        meta = read_json(meta_path, "cache metadata")
    except SFTError:
        return Loaded(None, "meta.json is not valid JSON")
    if not isinstance(meta, dict) or meta.get("code_version") != CODE_VERSION:
        return Loaded(None, f"written by cache code version {meta.get('code_version') if isinstance(meta, dict) else '?'}, "
                            f"this is {CODE_VERSION}")
    if meta.get("key") != key:
        return Loaded(None, "its key does not match its settings")
    arrays = {}
    for name, dtype in ARRAYS.items():
        want = meta.get("files", {}).get(name, {})
        try:
            a = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            return Loaded(None, f"{name}.npy is unreadable or truncated ({str(e).splitlines()[0][:80]})")
        if list(a.shape) != want.get("shape") or a.dtype != np.dtype(dtype):
            return Loaded(None, f"{name}.npy has shape {list(a.shape)} {a.dtype}, meta.json says {want.get('shape')}")
        if _crc(a) != want.get("crc32"):
            return Loaded(None, f"{name}.npy fails its checksum")
        arrays[name] = a.view(np.ndarray)  # still the mapped file; slicing a plain view is cheaper
    return Loaded(Tokenized(**arrays, stats=meta["stats"]), None)


class Entry(NamedTuple):
    tokenized: Tokenized
    status: str        # "hit" | "built" | "rebuilt"
    folder: Path


def load_or_build(file: DataFile, name: str, masking: Masking, tokenizer: dict, cache_dir: Path, workers: Workers,
                  full_hash: bool = False, log=print) -> Entry:
    """The file's arrays from the cache, or tokenized now and cached (a bad entry: rebuilt, with a notice)."""
    key = cache_key(file, masking, tokenizer, full_hash)
    folder = entry_folder(cache_dir, name, key)
    got = load(folder, key)
    if got.tokenized is not None:
        return Entry(got.tokenized, "hit", folder)
    if got.problem:
        log(f"data cache: {folder} is not usable ({got.problem}); rebuilding it")
    save(folder, tokenize_file(file, masking, workers), key)
    again = load(folder, key)
    if again.tokenized is None:
        raise SFTError(f"{folder}: the cache entry just written does not read back ({again.problem}); "
                       "is the disk full or the folder shared with a different version?")
    return Entry(again.tokenized, "rebuilt" if got.problem else "built", folder)
