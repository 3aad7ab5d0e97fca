"""Specs for model/safetensors.py: exact round trips, lazy reads and every bound checked."""
import json
import struct

import pytest
import torch

from model.errors import SFTError
from model.safetensors import (INDEX_NAME, SafeFile, load_file, load_sharded, save_file,
                               save_sharded)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "f64": torch.randn(1, generator=g).double(),
        "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.tensor([-1, 2], dtype=torch.int16), "i8": torch.tensor([-7], dtype=torch.int8),
        "u8": torch.tensor([255, 0], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
    }


def write_raw(path, header: dict, data: bytes, length: int | None = None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def test_every_dtype_round_trips_bit_identical(tmp_path):
    t = sample_tensors()
    save_file(t, tmp_path / "a.safetensors", metadata={"note": "x"})
    back = load_file(tmp_path / "a.safetensors")
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and back[k].shape == t[k].shape
        assert torch.equal(back[k].view(-1).view(torch.uint8) if t[k].numel() else back[k],
                           t[k].view(-1).view(torch.uint8) if t[k].numel() else t[k])
    assert SafeFile(tmp_path / "a.safetensors").metadata == {"format": "pt", "note": "x"}


def test_tensors_are_aligned_and_the_header_padded_to_8_bytes(tmp_path):
    save_file(sample_tensors(), tmp_path / "a.safetensors")
    f = SafeFile(tmp_path / "a.safetensors")
    assert f.data_start % 8 == 0
    for dtype, _, begin, _ in f.entries.values():
        assert begin % dtype.itemsize == 0


def test_writing_to_a_loaded_tensor_never_changes_the_file(tmp_path):
    save_file({"w": torch.ones(4)}, tmp_path / "a.safetensors")
    t = load_file(tmp_path / "a.safetensors")["w"]
    t.mul_(3)
    assert torch.equal(load_file(tmp_path / "a.safetensors")["w"], torch.ones(4))


def test_sharded_save_with_a_small_max_shard_reloads_identically(tmp_path):
    t = {f"w{i}": torch.randn(64) for i in range(10)}  # 256 bytes each
    names = save_sharded(t, tmp_path, max_shard_bytes=600)
    assert names[-1] == INDEX_NAME and len(names) == 6  # 2 tensors per shard
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 2560 and len(index["weight_map"]) == 10
    back = load_sharded(tmp_path)
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_small_tensors_go_to_a_single_file_without_index(tmp_path):
    assert save_sharded({"a": torch.ones(2)}, tmp_path, max_shard_bytes=1 << 20) == ["model.safetensors"]
    assert not (tmp_path / INDEX_NAME).exists()


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    save_sharded({"a": torch.ones(64), "b": torch.ones(64)}, tmp_path, max_shard_bytes=300)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SFTError, match=r"model.safetensors.index.json.*model-00002-of-00002.*missing"):
        load_sharded(tmp_path)


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("header,data,length,message", [
    (GOOD, b"\0" * 12, 10**6, "larger than the file"),
    (GOOD, b"\0" * 12, 2**62, "exceeds the"),
    (GOOD, b"\0" * 10, None, r"tensor 'b'.*out of range"),
    ({**GOOD, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "overlaps"),
    ({**GOOD, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, b"\0" * 16, None, "gap"),
    (GOOD, b"\0" * 20, None, "trailing bytes"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, r"tensor 'a'.*unknown dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, r"tensor 'a'.*needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "needs dtype, shape and data_offsets"),
])
def test_corrupt_files_raise_an_error_naming_the_file(tmp_path, header, data, length, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(SFTError, match=message) as err:
        SafeFile(path)
    assert "bad.safetensors" in str(err.value)


def test_truncated_and_non_json_files_raise_naming_the_file(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(SFTError, match=r"short.safetensors: truncated"):
        SafeFile(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 3) + b"{x]")
    with pytest.raises(SFTError, match=r"junk.safetensors: header is not valid JSON"):
        SafeFile(tmp_path / "junk.safetensors")
    dup = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    (tmp_path / "dup.safetensors").write_bytes(struct.pack("<Q", len(dup)) + dup + b"\0\0")
    with pytest.raises(SFTError, match=r"dup.safetensors: header names tensor 'a' twice"):
        SafeFile(tmp_path / "dup.safetensors")
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(100)}, good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(SFTError, match=r"cut.safetensors: tensor 'w'.*out of range"):
        SafeFile(tmp_path / "cut.safetensors")


def test_real_shared_checkpoint_reads_lazily(tiny_llama2_dir):
    t = load_sharded(tiny_llama2_dir)
    assert t["model.embed_tokens.weight"].shape == (32000, 64)
    assert len(t) == 21
