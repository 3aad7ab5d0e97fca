"""data/pipeline.py: tokenizing in N processes gives the output of one, id for id; files are
streamed; rows built from the flat arrays equal the list packer's; under torchrun only rank 0
tokenizes and every rank gets the same rows. This file is also the torchrun entry (`--worker`)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # torchrun starts this file as a script
    sys.path.insert(0, str(ROOT))

from data.chat import chat_for  # noqa: E402
from data.masking import sample_segments, tokenize_segments  # noqa: E402
from data.packing import collate, pack  # noqa: E402
from data.pipeline import Masking, Workers, tokenize_file  # noqa: E402
from data.sources import DataFile  # noqa: E402
from model.errors import SFTError  # noqa: E402
from model.loss import IGNORE_INDEX  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from training import distributed as D  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import pack_parts, prepare_data  # noqa: E402

MASKING = Masking("train_on_assistant", 64, True)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def varied(n: int) -> list[dict]:
    """Alpaca records of many lengths; every 9th has a prompt too long to keep a trained token."""
    return [{"instruction": ("word " * 70 if i % 9 == 4 else f"Question {i}: " + "why " * (i % 7)),
             "input": "", "output": "Because " + "so " * (i % 11)} for i in range(n)]


def oasst_tree(i: int) -> dict:
    msg = lambda role, text, replies: {"message_id": f"{i}-{role}", "role": role, "text": text,  # noqa: E731
                                       "review_result": True, "rank": 0, "lang": "en", "replies": replies}
    return {"message_tree_id": str(i), "prompt": msg("prompter", f"Tree {i}?", [msg("assistant", f"Leaf {i}.", [])])}


def tokenized(tok, path: Path, workers: int, max_records: int = 0, chunk: int = 8):
    file = DataFile(path, "auto", max_records, "", "alpaca", "")
    with Workers(tok, workers) as w:
        return tokenize_file(file, MASKING, w, progress=False, chunk_records=chunk)


def same(a, b) -> bool:
    return (a.stats == b.stats and all(np.array_equal(getattr(a, k), getattr(b, k))
                                       for k in ("input_ids", "trained", "offsets", "conversation")))


def test_two_workers_give_the_output_of_one_process_id_for_id(tmp_path, tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    path = write_jsonl(tmp_path / "varied.jsonl", varied(61))
    one, two = tokenized(tok, path, 1), tokenized(tok, path, 2)
    assert same(one, two)
    assert one.stats["conversations"] == 61 and one.stats["dropped"]["no_trainable_token"] == 7
    assert one.stats["samples"] == 54 == one.n_samples and one.stats["tokens"] == len(one.input_ids)
    cut = tokenized(tok, path, 2, max_records=37)  # stops inside a chunk
    assert cut.stats["conversations"] == 37 and same(cut, tokenized(tok, path, 1, max_records=37))
    assert np.array_equal(cut.input_ids, one.input_ids[:len(cut.input_ids)])


def test_a_jsonl_file_is_streamed_so_max_records_stops_reading(tmp_path, tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    path = tmp_path / "torn.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in varied(20)) + '{"instruction": "cut off')
    assert tokenized(tok, path, 1, max_records=20).stats["conversations"] == 20  # line 21 never parsed
    with pytest.raises(SFTError, match=r"torn.jsonl:21: not valid JSON"):
        tokenized(tok, path, 2)


def test_max_records_counts_conversations_of_oasst_trees(tmp_path, tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    path = write_jsonl(tmp_path / "trees.jsonl", [oasst_tree(i) for i in range(20)])
    got = tokenized(tok, path, 2, max_records=13)
    assert got.stats["conversations"] == 13 and got.conversation.tolist() == list(range(13))


def test_rows_from_the_flat_arrays_equal_the_list_packer(tmp_path, tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    flat = tokenized(tok, write_jsonl(tmp_path / "v.jsonl", varied(40)), 1)
    samples = [{"input_ids": flat.input_ids[a:b].tolist(),
                "labels": [i if t else IGNORE_INDEX for i, t in zip(flat.input_ids[a:b], flat.trained[a:b])]}
               for a, b in zip(flat.offsets[:-1], flat.offsets[1:])]
    order = np.array([3, 1, 1, 0, 7, 5, 2, 2, 9] + list(range(10, flat.n_samples)))  # repeats, any order
    rows = pack_parts([(flat, order[:9]), (flat, order[9:])], 64)
    ref = collate(pack([samples[i] for i in order], 64))
    assert rows["input_ids"].dtype == torch.int32
    assert all(torch.equal(rows[k].long(), ref[k]) for k in ref)


@pytest.mark.parametrize("template", ["alpaca", "chatml", "llama3", "zephyr"])
def test_tokenizing_each_segment_once_gives_the_labels_of_tokenizing_every_prefix(pico_dir, template):
    tok = Tokenizer.from_pretrained(pico_dir)
    conv = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello.\n\nHow can I help?"}, {"role": "user", "content": " x  y"},
            {"role": "assistant", "content": "Sure: 1, 2, 3."}]
    segs = [(t, f) for t, _, f in sample_segments(template, conv, bos_token=tok.bos_token, eos_token=tok.eos_token)[0]]
    ids, flags = tokenize_segments(tok, segs)
    # reference: the end of each run of equal flags is where the text up to it, tokenized whole, ends
    full, ref, at = "".join(t for t, _ in segs), [], 0
    for k, (text, flag) in enumerate(segs):
        at += len(text)
        end = len(ids) if k == len(segs) - 1 else len(tok.encode(full[:at]))
        ref += [flag] * (end - len(ref))
    assert ids == tok.encode(full) and flags == ref


# ----------------------------------------------------------------------------- torchrun

STANDALONE = ("--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--nnodes=1")


def rows_digest(rows) -> str:
    return hashlib.sha256(b"".join(rows[k].numpy().tobytes() for k in sorted(rows))).hexdigest()


def worker(spec: dict) -> None:
    D.init_distributed("cpu")
    cfg = load_config(None, spec["overrides"])
    data = prepare_data(cfg, chat_for(cfg.model.path, Tokenizer.from_pretrained(cfg.model.path), cfg.data.template))
    seen = {"cache": {n: r["cache"] for n, r in data.report["sources"].items()}, "rows": rows_digest(data.train),
            "held_out": rows_digest(data.held_out)}
    (Path(spec["out"]) / f"rank{D.rank()}.json").write_text(json.dumps(seen))
    D.teardown(clean=True)


def test_under_torchrun_only_rank_0_tokenizes_and_both_ranks_get_the_same_rows(tmp_path, tiny_dir):
    files = {"a": write_jsonl(tmp_path / "a.jsonl", varied(30)), "b": write_jsonl(tmp_path / "b.jsonl", varied(12))}
    overrides = [f"model.path={tiny_dir}", f"run.out_dir={tmp_path / 'out'}", "data.max_seq_len=64",
                 "data.sources=[" + ", ".join(f'{{path = "{p}"}}' for p in files.values()) + "]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *STANDALONE, __file__, "--worker",
           json.dumps({"overrides": overrides, "out": str(tmp_path)})]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["cache"] == {"a": "built", "b": "built"} and rank1["cache"] == {"a": "hit", "b": "hit"}
    assert rank0["rows"] == rank1["rows"] and rank0["held_out"] == rank1["held_out"]
    one = prepare_data(load_config(None, overrides), chat_for(tiny_dir, Tokenizer.from_pretrained(tiny_dir), "auto"))
    assert rows_digest(one.train) == rank0["rows"]  # and one process later maps the same cache


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(json.loads(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/test_distributed.py: no C++ static destructors after gloo
