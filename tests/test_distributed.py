"""Data parallelism is an implementation detail: 2 processes must take the step 1 process takes.

Each test trains a tiny random Llama for a few steps twice: once in this process (no process
group, gradient accumulation over the whole global batch), once as 2 REAL processes started by
torchrun on 127.0.0.1 with gloo, FSDP2-sharded, each doing half the micro-batches. Micro-batches
hold different numbers of trainable tokens (packed rows, masked prompts), so any mistake in the
global normalisation (per-rank or per-micro-batch averaging, FSDP's average over ranks left
uncompensated) shows up as a different loss. The worker below is the minimal training loop
built only from training/distributed.py, model/ and training/optim.py; this file is also the
torchrun entry point (`--worker`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # torchrun starts this file as a script
    sys.path.insert(0, str(ROOT))

from model.llama import Config, Transformer  # noqa: E402
from model.loss import masked_ce_sum  # noqa: E402
from training import distributed as D  # noqa: E402
from training.optim import build_optimizer  # noqa: E402

N_ROWS, T, ROWS_PER_STEP, MICRO = 16, 24, 8, 2
TOL = 1e-5
# Weights are compared after AdamW, whose update m / sqrt(v) turns the last-bit differences of a
# near-zero gradient entry (the order of the sum over ranks is not the order over micro-batches)
# into differences of up to ~lr in that entry; at lr 1e-3 they stay well below TOL. Entries of
# size ~1 (norm weights) also carry a few ulps of fp32 rounding: hence rtol TOL as well.


def tiny_model(finetune: str) -> Transformer:
    torch.manual_seed(0)
    cfg = Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 tie_word_embeddings=finetune == "full")
    model = Transformer(cfg)
    if finetune in ("lora", "qlora"):
        from lora import apply_lora
        if finetune == "qlora":  # frozen base in NF4: buffers FSDP leaves whole on every rank
            from model.nf4 import quantize_model_linears
            quantize_model_linears(model)
        apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
        with torch.no_grad():  # B starts at 0; make it nonzero so every adapter weight moves
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
    return model


def packed_rows() -> dict[str, torch.Tensor]:
    """(N_ROWS, T) packed rows of two samples each; prompts and sample starts masked (-100)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (N_ROWS, T), generator=g)
    labels, pos, seq = ids.clone(), torch.zeros_like(ids), torch.zeros_like(ids)
    for r in range(N_ROWS):
        cut = int(torch.randint(4, T - 4, (1,), generator=g))
        for s, (a, b) in enumerate(((0, cut), (cut, T))):
            seq[r, a:b], pos[r, a:b] = s, torch.arange(b - a)
            prompt = int(torch.randint(1, b - a, (1,), generator=g))  # varies tokens per row
            labels[r, a:a + prompt] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "seq_ids": seq}


def run(spec: dict) -> dict:
    """The minimal loop: spec = finetune, steps, start, resume (file), save_at, out, ckpt."""
    info = D.init_distributed("cpu")
    model = tiny_model(spec["finetune"])
    if spec.get("resume"):
        state = torch.load(spec["resume"], weights_only=False)
        model.load_state_dict(state["model"], strict=spec["finetune"] == "full")  # LoRA: adapters
    D.shard_model(model, mixed_precision=False,
                  activation_checkpointing=spec.get("activation_checkpointing", False))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    if spec.get("resume"):
        D.load_optimizer_state(model, opt, state["optimizer"])
    data, losses, norms = packed_rows(), [], []
    for step in range(spec.get("start", 0), spec["steps"]):
        rows = D.step_rows(N_ROWS, step, ROWS_PER_STEP, seed=3)
        micro = D.rank_micro_batches(rows, MICRO, info.rank, info.world_size)
        n_local = sum(int((data["labels"][mb, 1:] != -100).sum()) for mb in micro)
        n_global = D.global_token_count(n_local)
        loss_sum = 0.0
        for mb in micro:
            hidden = model(data["input_ids"][mb], position_ids=data["position_ids"][mb],
                           seq_ids=data["seq_ids"][mb], return_hidden=True)
            s, _ = masked_ce_sum(model, hidden, data["labels"][mb], chunk_size=16)
            (s * D.loss_scale(n_global)).backward()
            loss_sum += s.item()
        norms.append(D.clip_grad_norm(model.parameters(), 0.5))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(D.all_reduce_sum(loss_sum) / n_global)
        if step + 1 == spec.get("save_at"):
            state = {"model": D.full_model_state_dict(model, trainable_only=spec["finetune"] != "full"),
                     "optimizer": D.full_optimizer_state_dict(model, opt)}
            if info.is_main:
                torch.save(state, spec["ckpt"])
    final = D.full_model_state_dict(model)
    if info.is_main and spec.get("out"):
        torch.save({"losses": losses, "norms": norms, "weights": final}, spec["out"])
    D.teardown(clean=True)
    return {"losses": losses, "norms": norms, "weights": final}


# One node, rendezvous on a port the c10d store picks itself (localhost:0): no port is chosen
# here and then lost to another process before torchrun binds it.
STANDALONE = ("--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--nnodes=1")


def torchrun(spec: dict, tmp_path: Path, nproc: int = 2) -> dict:
    spec = {**spec, "out": str(tmp_path / "out.pt")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *STANDALONE, __file__,
           "--worker", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return torch.load(spec["out"], weights_only=False)


def assert_same_run(ours: dict, ref: dict) -> None:
    assert len(ours["losses"]) == len(ref["losses"])
    for a, b in zip(ours["losses"], ref["losses"]):
        assert abs(a - b) <= TOL, (ours["losses"], ref["losses"])
    # the gradient itself, before clipping: AdamW hides a wrong scale, the norm does not
    for a, b in zip(ours["norms"], ref["norms"]):
        assert abs(a - b) <= TOL * b, (ours["norms"], ref["norms"])
    assert ours["weights"].keys() == ref["weights"].keys()
    for k, w in ref["weights"].items():
        if w.is_floating_point():
            assert torch.allclose(ours["weights"][k], w, atol=TOL, rtol=TOL), k
        else:  # NF4 codes
            assert torch.equal(ours["weights"][k], w), k


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as each torchrun worker (OMP_NUM_THREADS=1)
    yield
    torch.set_num_threads(before)


def test_two_processes_full_finetune_match_one_process_and_resume_in_one(tmp_path, one_thread):
    ref = run({"finetune": "full", "steps": 4})
    ckpt = str(tmp_path / "step2.pt")
    two = torchrun({"finetune": "full", "steps": 4, "save_at": 2, "ckpt": ckpt,
                    "activation_checkpointing": True}, tmp_path)
    assert ref["losses"][-1] < ref["losses"][0]  # it trains
    assert_same_run(two, ref)
    # the state written by 2 sharded processes continues in 1 plain process on the same curve
    resumed = run({"finetune": "full", "steps": 4, "start": 2, "resume": ckpt})
    assert_same_run(resumed, {"losses": ref["losses"][2:], "norms": ref["norms"][2:],
                              "weights": ref["weights"]})


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_two_processes_lora_and_qlora_match_one_process(finetune, tmp_path, one_thread):
    ref = run({"finetune": finetune, "steps": 3})
    two = torchrun({"finetune": finetune, "steps": 3}, tmp_path)
    assert_same_run(two, ref)
    base = tiny_model(finetune).state_dict()
    moved = [k for k in base if not torch.equal(base[k], ref["weights"][k])]
    assert moved and all("lora" in k for k in moved)  # only adapters trained


def test_step_rows_are_the_same_for_any_world_size_and_split_evenly():
    rows = D.step_rows(10, 3, 8, seed=0)  # crosses from epoch 2 into epoch 3
    assert len(rows) == 8
    stream = sum((D.epoch_order(10, 0, e) for e in range(4)), [])
    assert rows == stream[24:32]
    parts = [D.rank_micro_batches(rows, 2, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [2, 2]
    assert sorted(i for p in parts for mb in p for i in mb) == sorted(rows)
    with pytest.raises(ValueError):
        D.rank_micro_batches(rows, 3, 0, 2)


def test_eval_batches_give_every_rank_the_same_count_and_cover_each_row_once():
    for n_rows, bs, world in ((7, 2, 2), (9, 2, 2), (5, 4, 3)):
        parts = [D.eval_batches(n_rows, bs, r, world) for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # FSDP forwards are collective
        assert sorted(i for p in parts for b in p for i in b) == list(range(n_rows))


# ---------------------------------------------------------------------------- train.py itself

QUICKSTART = ROOT / "data" / "quickstart" / "alpaca_300.jsonl"


def train_overrides(tmp_path: Path, model_dir: Path, name: str) -> list[str]:
    return [f"model.path={model_dir}", f"run.out_dir={tmp_path}", f"run.name={name}",
            f"data.train={QUICKSTART}", "data.max_records=20", "data.max_seq_len=128",
            "data.eval_fraction=0.25", "train.batch_size=4", "train.grad_accum=1",
            "train.max_steps=4", "optim.lr=1e-3", "optim.warmup_steps=1", "eval.sample_prompts=0",
            "run.threads=1", "run.save_every=2", "run.keep_last_n=0"]


def metrics(run_dir: Path, kind: str, key: str) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if r["kind"] == kind]


def test_train_py_under_torchrun_splits_grad_accum_1_matches_one_process_and_resumes_in_one(tmp_path, one_thread,
                                                                                          tiny_dir):
    import shutil

    from model.checkpoint import load_pretrained
    from training import loop as T
    from training.config import load_config

    model_dir = tiny_dir
    T.train(load_config(None, train_overrides(tmp_path, model_dir, "one")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *STANDALONE, str(ROOT / "train.py"),
           *train_overrides(tmp_path, model_dir, "two")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # grad_accum=1 (as in the shipped configs) on 2 processes: the step's 4 rows run as 2 x 2, said once
    assert res.stdout.count("run as 2 micro-batches of 2") == 1, res.stdout[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    # grad_norm gets 1e-4 relative: torch's fp32 CPU norm of the 131k-entry embedding gradient is
    # itself off by ~1e-5 (against fp64), and one shard's norm is off differently
    for kind, key, tol in (("train", "loss", TOL), ("eval", "eval_loss", TOL),
                           ("train", "grad_norm", 1e-4)):
        a, b = metrics(one, kind, key), metrics(two, kind, key)
        assert len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(x))
                                        for x, y in zip(a, b)), (key, a, b)
    w1, w2 = load_pretrained(one / "final").state_dict(), load_pretrained(two / "final").state_dict()
    assert all(torch.allclose(w1[k], w2[k], atol=TOL, rtol=TOL) for k in w1)
    # the checkpoint written by 2 processes at step 2 resumes in 1 process on the same curve
    three = tmp_path / "three"
    shutil.copytree(two, three)
    for stale in ("step_4", "final"):
        shutil.rmtree(three / stale)
    T.train(load_config(None, train_overrides(tmp_path, model_dir, "three") + ["run.resume=true"]))
    a, c = metrics(one, "train", "loss"), metrics(three, "train", "loss")
    assert len(c) == 4 and all(abs(x - y) <= TOL for x, y in zip(a, c)), (a, c)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    run(json.loads(sys.argv[2]))
    # The work is done and written (rank 0) and the group closed. Leave without C++ static
    # destructors: a gloo thread still joinable at interpreter exit aborts the process now and
    # then ("terminate called without an active exception"), failing a run that succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
