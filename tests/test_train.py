"""The training loop as a specification: accumulation, exact resume, crash-safe saves, pruning."""
import json
from pathlib import Path

import pytest
import torch

import train
from training import loop as T
from training import step as S
from model.checkpoint import load_pretrained
from model.errors import SFTError
from model.loss import masked_ce_sum
from model.tokenizer import Tokenizer
from training import checkpointing as ckpt
from training.config import load_config
from training.optim import build_optimizer, lr_factor

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "data" / "quickstart" / "alpaca_300.jsonl"



def cfg_for(tmp_path, model_dir, name, *overrides):
    return load_config(None, [f"model.path={model_dir}", f"run.out_dir={tmp_path}",
                              f"run.name={name}", f"data.train={QUICKSTART}",
                              "data.max_records=24", "data.max_seq_len=160", "data.eval_fraction=0.2",
                              "train.batch_size=2", "train.grad_accum=2", "train.max_steps=6",
                              "optim.lr=3e-3", "optim.warmup_steps=2", "eval.sample_prompts=0",
                              "run.threads=1", *overrides])


def train_losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def synthetic_rows(n_rows=4, T_=24, V=4096, seed=0):
    """Packed rows of two samples each, with very different numbers of trainable tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(n_rows):
        cut = 6 + 4 * r  # sample boundary moves: trainable counts differ per row
        ids = torch.randint(3, V, (T_,), generator=g)
        labels = ids.clone()
        labels[: 2 + r] = -100           # prompt of sample 1
        labels[cut: cut + 3] = -100      # first token + prompt of sample 2
        pos = torch.cat([torch.arange(cut), torch.arange(T_ - cut)])
        seq = torch.cat([torch.zeros(cut, dtype=torch.long), torch.ones(T_ - cut, dtype=torch.long)])
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "seq_ids": seq})
    return rows


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def grads_after(model, batches, n_tokens):
    model.zero_grad()
    S.forward_backward(model, batches, 1.0 / n_tokens, chunk=7)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(tiny_dir):
    model = load_pretrained(tiny_dir).train()
    rows = synthetic_rows()
    n = sum(S.trainable_tokens(stack([r])) for r in rows)
    big = grads_after(model, [stack(rows)], n)
    accum = grads_after(model, [stack(rows[:1]), stack(rows[1:3]), stack(rows[3:])], n)
    assert ((accum - big).norm() / big.norm()).item() <= 1e-6
    # the bug this design avoids: averaging per micro-batch gives a different gradient
    model.zero_grad()
    for part in ([rows[0]], rows[1:3], [rows[3]]):
        b = stack(part)
        loss, k = masked_ce_sum(model, model(b["input_ids"], b["position_ids"], b["seq_ids"],
                                             return_hidden=True), b["labels"])
        (loss / k / 3).backward()
    naive = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert ((naive - big).norm() / big.norm()).item() > 1e-3


def test_resume_after_stop_reproduces_the_uninterrupted_losses_exactly(tmp_path, tiny_dir):
    full = T.train(cfg_for(tmp_path, tiny_dir, "full"))
    cfg = cfg_for(tmp_path, tiny_dir, "cut", "run.save_every=3")
    T.train(cfg, stop_after=4)  # dies after step 4; the newest checkpoint is step 3
    assert ckpt.latest_checkpoint(Path(tmp_path) / "cut").name == "step_3"
    cfg.run.resume = True
    resumed = T.train(cfg)
    assert train_losses(Path(tmp_path) / "cut") == train_losses(Path(tmp_path) / "full")
    assert len(train_losses(Path(tmp_path) / "full")) == 6
    assert resumed["eval_after"] == full["eval_after"]
    a, b = load_pretrained(full["final"]), load_pretrained(resumed["final"])
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_dir, monkeypatch):
    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: write half a file, then die
            Path(f).write_bytes(b"partial")
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    cfg = cfg_for(tmp_path, tiny_dir, "crash", "run.save_every=2", "run.keep_last_n=1")
    with pytest.raises(SFTError, match=r"step_4: cannot write \(disk full \(simulated\)\)"):
        T.train(cfg)
    run = Path(tmp_path) / "crash"
    assert [p.name for _, p in ckpt.step_dirs(run)] == ["step_2"]
    load_pretrained(run / "step_2")  # the weights of the previous checkpoint load
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    cfg.run.resume = True
    assert T.train(cfg)["steps"] == 6  # and training resumes from it
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".trash-*"))


def test_keep_last_n_prunes_old_checkpoints_and_final_model_loads(tmp_path, tiny_dir):
    out = T.train(cfg_for(tmp_path, tiny_dir, "prune", "run.save_every=1", "run.keep_last_n=2",
                          "train.max_steps=4"))
    run = Path(out["run_dir"])
    assert [p.name for _, p in ckpt.step_dirs(run)] == ["step_3", "step_4"]
    model = load_pretrained(out["final"])
    assert json.loads((run / "final" / "generation_config.json").read_text())["eos_token_id"] == 2
    assert Tokenizer.from_pretrained(out["final"]).chat_template  # carries the template it learned
    assert (run / "loss.svg").read_text().startswith("<svg") and (run / "config.toml").exists()
    assert model.config.hidden_size == 32


def test_existing_run_folder_is_not_silently_reused(tmp_path, tiny_dir):
    T.train(cfg_for(tmp_path, tiny_dir, "twice", "train.max_steps=1"))
    with pytest.raises(T.SFTError, match="finished run.*run.overwrite=true") as err:  # nothing to resume
        T.train(cfg_for(tmp_path, tiny_dir, "twice", "train.max_steps=1"))
    assert "run.resume" not in str(err.value)
    T.train(cfg_for(tmp_path, tiny_dir, "saved", "train.max_steps=1", "run.save_every=1"))
    with pytest.raises(T.SFTError, match="run.resume=true.*run.overwrite=true"):
        T.train(cfg_for(tmp_path, tiny_dir, "saved", "train.max_steps=1"))


def test_cli_prints_config_errors_on_one_line_and_exits_2(capsys):
    assert train.main(["optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'optim.lr'" in err
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "optim.warmup_steps" in capsys.readouterr().out


def test_finetuning_pico_base_on_shared_alpaca_lowers_held_out_loss(tmp_path, shared_file, pico_dir):
    data = shared_file("data/llamafactory_alpaca_en_demo.json")
    out = T.train(load_config(None, [
        f"model.path={pico_dir}", f"run.out_dir={tmp_path}", "run.name=pico", f"data.train={data}",
        "data.max_records=40", "data.max_seq_len=256", "data.eval_fraction=0.25",
        "train.batch_size=4", "train.max_steps=10", "optim.lr=5e-4", "optim.warmup_steps=2",
        "eval.sample_prompts=0", "run.threads=1"]))
    assert out["eval_after"] < out["eval_before"] - 0.1


def test_adamw_does_not_decay_norms_biases_or_frozen_weights(tiny_dir):
    model = load_pretrained(tiny_dir)
    model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert any(p is model.norm.weight for p in plain["params"])
    everything = [p for g in opt.param_groups for p in g["params"]]
    assert not any(p is model.layers[0].mlp.up_proj.weight for p in everything)


def test_lr_warms_up_linearly_then_follows_cosine_to_the_floor():
    f = [lr_factor(s, warmup=4, total=14, min_ratio=0.1) for s in range(15)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # non-increasing after warmup
    assert f[9] == pytest.approx(0.55) and f[14] == pytest.approx(0.1)


def test_qlora_run_saves_a_peft_adapter_and_a_merged_model_with_the_same_logits(tmp_path, tiny_dir):
    from lora import load_adapter
    from model.nf4 import load_quantized

    cfg = cfg_for(tmp_path, tiny_dir, "qlora", "model.finetune=qlora", "lora.save_merged=true",
                  "train.max_steps=2", "optim.lr=3e-2")
    T.train(cfg)
    run = tmp_path / "qlora"
    assert (run / "final" / "adapter_config.json").exists()
    adapted = load_adapter(load_quantized(tiny_dir, compute_dtype=torch.float32), run / "final")
    merged = load_pretrained(run / "merged")
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert (adapted(ids) - load_quantized(tiny_dir, compute_dtype=torch.float32)(ids)).abs().max() > 0
        assert torch.allclose(merged(ids), adapted(ids), atol=1e-5)


def test_bf16_mixed_keeps_fp32_weights_and_state_but_computes_in_bf16(tmp_path, tiny_dir, monkeypatch):
    seen, built = set(), []
    real_linear = torch.nn.functional.linear

    def spy(x, w, b=None):  # what the matmuls actually run in (autocast casts inside F.linear)
        out = real_linear(x, w, b)
        seen.add(out.dtype)
        return out

    real_build = T.build_optimizer

    def keep(*a, **k):
        built.append(real_build(*a, **k))
        return built[-1]
    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    monkeypatch.setattr(T, "build_optimizer", keep)
    T.train(cfg_for(tmp_path, tiny_dir, "fp32"))
    assert torch.bfloat16 not in seen
    mixed = T.train(cfg_for(tmp_path, tiny_dir, "mixed", "model.dtype=bf16-mixed"))
    assert torch.bfloat16 in seen
    state = [s for st in built[-1].state.values() for s in st.values() if torch.is_tensor(s) and s.ndim]
    assert state and {s.dtype for s in state} == {torch.float32}
    assert {p.dtype for p in load_pretrained(mixed["final"]).parameters()} == {torch.float32}
    a, b = train_losses(Path(tmp_path) / "fp32"), train_losses(Path(tmp_path) / "mixed")
    assert a != b and all(abs(x - y) < 0.05 * x for x, y in zip(a, b))  # bf16 rounding, same run
    assert mixed["eval_after"] < mixed["eval_before"]
