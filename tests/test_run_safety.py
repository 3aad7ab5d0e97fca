"""A run never loses the user's work: the lock, overwrite, resume refusal, fallback and signals.

tests/test_faults_cli.py shows each fault ending in one line with nothing changed; here are the
behaviours themselves (training/run_folder.py, training/checkpointing.py, model/cli.py):

- which options may change on resume and which are refused (every option is classified);
- run.overwrite keeps the earlier run in <name>.previous until the new one has finished, and
  puts it back when the new one fails before saving anything;
- a lock left by a process that is gone is taken over; a live one stops a second run;
- a checkpoint that cannot be read gives way to the one before it;
- SIGINT and SIGTERM end a real run with one line, status 130 / 143, the last checkpoint intact
  and the lock released, while a second run on the same folder was refused naming the first.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from model.cli import Interrupted, run_cli, uninterrupted
from model.errors import SFTError
from training import checkpointing as ckpt
from training import loop as T
from training.config import Config, all_keys, load_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "quickstart" / "alpaca_300.jsonl"

# What may change between a checkpoint and its resume: speed, logging, saving, where. Any other
# option shapes the run (its math or its data order) and a change of it is refused.
MAY_CHANGE = {"run.name", "run.out_dir", "run.resume", "run.overwrite", "run.save_every", "run.keep_last_n",
              "run.threads", "run.device", "train.loss_chunk", "train.activation_checkpointing", "train.compile",
              "train.speedups", "train.log_every", "train.max_bad_steps", "eval.every", "eval.max_rows",
              "eval.sample_prompts", "eval.max_new_tokens", "lora.save_merged"}


def args(out: Path, model: Path, name: str, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data.train={DATA}", f"run.out_dir={out}", f"run.name={name}",
            "data.max_records=16", "data.max_seq_len=256", "train.batch_size=2", "train.max_steps=3",
            "optim.warmup_steps=1", "eval.sample_prompts=0", "run.threads=1", *extra]


def changed(value):
    """Another value of the same kind (shaping_settings compares values; it does not check ranges)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, "x"]
    return f"{value}x"


def test_every_option_is_either_free_to_change_on_resume_or_refused(tmp_path):
    cfg = Config()
    base = ckpt.shaping_settings(cfg, files=False)
    refused = set()
    for key in all_keys(cfg):
        section, name = key.split(".")
        other = dataclasses.replace(cfg, **{section: dataclasses.replace(
            getattr(cfg, section), **{name: changed(getattr(getattr(cfg, section), name))})})
        if ckpt.settings_changes(base, ckpt.shaping_settings(other, files=False)):
            refused.add(key)
    assert ckpt.FREE == MAY_CHANGE
    assert refused == set(all_keys(cfg)) - MAY_CHANGE - set(ckpt.FILES)
    assert {"optim.lr", "train.batch_size", "train.grad_accum", "data.max_seq_len", "run.seed", "model.finetune",
            "lora.r", "lora.alpha", "lora.dropout", "lora.targets", "model.dtype", "data.template"} <= refused


@pytest.fixture(scope="module")
def checkpointed(tiny_dir, tmp_path_factory) -> tuple[Path, Config]:
    """A run folder with step_1/ and the config that wrote it."""
    out = tmp_path_factory.mktemp("checkpointed")
    cfg = load_config(None, args(out, tiny_dir, "r", "run.save_every=1"))
    T.train(cfg, stop_after=1)
    return out / "r", cfg


SHAPING = sorted(set(all_keys(Config())) - MAY_CHANGE - {"model.path", "data.train", "data.eval"})


@pytest.mark.parametrize("key", SHAPING)
def test_resuming_with_a_shaping_setting_changed_is_refused_naming_it(key, checkpointed):
    run_dir, cfg = checkpointed
    section, name = key.split(".")
    other = dataclasses.replace(cfg, **{section: dataclasses.replace(
        getattr(cfg, section), **{name: changed(getattr(getattr(cfg, section), name))})})
    with pytest.raises(SFTError, match=rf"step_1: resuming with other settings .*\({key}: ") as err:
        ckpt.resume_point(run_dir, None, "full", ckpt.shaping_settings(other), total_steps=3)
    assert "\n" not in str(err.value)


def test_data_files_and_the_base_model_are_compared_by_content_not_by_path(tmp_path, tiny_dir):
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(tiny_dir, moved / "model")
    (moved / "data.jsonl").write_bytes(DATA.read_bytes())
    a = ckpt.shaping_settings(load_config(None, [f"model.path={tiny_dir}", f"data.train={DATA}"]))
    elsewhere = [f"model.path={moved / 'model'}", f"data.train={moved / 'data.jsonl'}"]
    assert ckpt.settings_changes(a, ckpt.shaping_settings(load_config(None, elsewhere))) == []
    (moved / "data.jsonl").write_bytes(DATA.read_bytes() + DATA.read_bytes()[:200])
    b = ckpt.shaping_settings(load_config(None, elsewhere))
    assert [c.split(":")[0] for c in ckpt.settings_changes(a, b)] == ["data.train"]


def test_a_checkpoint_without_stored_settings_is_compared_with_the_run_config_toml(tmp_path, tiny_dir):
    import torch
    T.train(load_config(None, args(tmp_path, tiny_dir, "r", "run.save_every=1")), stop_after=1)
    path = tmp_path / "r" / "step_1" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "settings"}, path)  # as written before they were
    with pytest.raises(SFTError, match=r"optim.lr: 0.0003 -> 0.01"):
        T.train(load_config(None, args(tmp_path, tiny_dir, "r", "run.save_every=1", "run.resume=true",
                                       "optim.lr=1e-2")))
    done = T.train(load_config(None, args(tmp_path, tiny_dir, "r", "run.save_every=1", "run.resume=true")))
    assert done["steps"] == 3


def test_overwrite_keeps_the_earlier_run_until_the_new_one_finishes(tmp_path, tiny_dir):
    T.train(load_config(None, args(tmp_path, tiny_dir, "r")))
    run, previous = tmp_path / "r", tmp_path / "r.previous"
    old_final = (run / "final" / "model.safetensors").read_bytes()
    # the new run saves step_1 and then stops (a crash): both runs are on disk
    T.train(load_config(None, args(tmp_path, tiny_dir, "r", "run.overwrite=true", "run.save_every=1",
                                   "optim.lr=1e-2")), stop_after=1)
    assert (previous / "final" / "model.safetensors").read_bytes() == old_final
    assert (run / "step_1").is_dir() and not (run / "final").exists() and not (run / ".lock").exists()
    with pytest.raises(SFTError, match="r.previous holds the run that an earlier run.overwrite=true replaced"):
        T.train(load_config(None, args(tmp_path, tiny_dir, "r", "run.overwrite=true")))
    # resuming is allowed; when it finishes, the earlier run is no longer needed
    T.train(load_config(None, args(tmp_path, tiny_dir, "r", "run.resume=true", "run.save_every=1", "optim.lr=1e-2")))
    assert (run / "final").is_dir()
    T.train(load_config(None, args(tmp_path, tiny_dir, "r", "run.overwrite=true")))
    assert not previous.exists() and (run / "final").is_dir() and not (run / "step_1").exists()


def test_a_failure_before_the_first_save_puts_the_earlier_run_back(tmp_path, tiny_dir, monkeypatch):
    T.train(load_config(None, args(tmp_path, tiny_dir, "r", "run.save_every=1")))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def stop(*a, **k):
        raise Interrupted(signal.SIGINT)
    monkeypatch.setattr(T, "forward_backward", stop)
    with pytest.raises(Interrupted) as caught:
        T.train(load_config(None, args(tmp_path, tiny_dir, "r", "run.overwrite=true", "run.save_every=1")))
    assert "at step 0 of 3" in caught.value.note and "as it was" in caught.value.note
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_lock_left_by_a_process_that_is_gone_is_taken_over(tmp_path, tiny_dir, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".lock").write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename}))
    T.train(load_config(None, args(tmp_path, tiny_dir, "r")))
    assert f"process {gone.pid} that held it is gone; taking the lock over" in capsys.readouterr().out
    assert (tmp_path / "r" / "final").is_dir() and not (tmp_path / "r" / ".lock").exists()


def test_a_checkpoint_that_cannot_be_read_gives_way_to_the_one_before(tmp_path, tiny_dir, capsys):
    extra = ("run.save_every=1", "run.keep_last_n=0")
    T.train(load_config(None, args(tmp_path, tiny_dir, "r", *extra)), stop_after=2)
    (tmp_path / "r" / "step_2" / "trainer_state.pt").write_bytes(b"PK\x03\x04 cut short")
    out = T.train(load_config(None, args(tmp_path, tiny_dir, "r", *extra, "run.resume=true")))
    said = capsys.readouterr().out
    assert "step_2/trainer_state.pt: not a trainer state this version can read" in said
    assert f"resuming from the checkpoint before it, {tmp_path / 'r' / 'step_1'}" in said
    assert out["steps"] == 3 and "resumed from" in said and "(step 1," in said


def test_a_grad_accum_that_processes_cannot_share_is_split_finer_or_says_what_to_pass():
    assert T.split_step(8, 1, 1) == (8, 1)
    assert T.split_step(8, 1, 2) == (4, 2)
    assert T.split_step(8, 3, 2) == (4, 6)
    assert T.split_step(8, 4, 2) == (8, 4)
    with pytest.raises(SFTError, match=r"3 rows per step do not split evenly over 2 processes; pass "
                                       r"train.grad_accum=2"):
        T.split_step(3, 1, 2)


def test_the_eval_command_printed_after_a_run_names_the_base_model_for_an_adapter():
    full = load_config(None, ["model.path=base"])
    lora = load_config(None, ["model.path=base", "model.finetune=qlora"])
    assert T.eval_command(full, Path("r/final")) == "python eval.py --model r/final"
    assert T.eval_command(lora, Path("r/final")) == "python eval.py --model base --adapter r/final"


def test_only_rank_0_prints_an_error_and_every_rank_exits_2(monkeypatch, capsys):
    def fail():
        raise SFTError("data.jsonl:3: not valid JSON")
    monkeypatch.setenv("RANK", "1")
    assert run_cli(fail) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert run_cli(fail, prog="eval.py") == 2
    assert capsys.readouterr().err == "eval.py: error: data.jsonl:3: not valid JSON\n"


def test_a_signal_inside_uninterrupted_waits_for_the_block_to_end(capsys):
    done = []

    def work():
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, and waits
            done.append("renames finished")
        done.append("never")
    assert run_cli(work) == 143 and done == ["renames finished"]
    assert capsys.readouterr().err == "stopped: SIGTERM\n"


def test_sigint_and_sigterm_stop_a_real_run_with_one_line_and_a_second_run_is_refused(tmp_path, tiny_dir, cli_runner):
    """Real `python train.py` processes (forked by tests/cli_forks.py): the first runs until the
    second, started once step_2/ exists, has been refused; then it gets SIGINT. A resume of it
    gets SIGTERM two checkpoints later."""
    run, argv = tmp_path / "r", ["train.py", *args(tmp_path, tiny_dir, "r", "train.max_steps=100000",
                                                  "run.save_every=2", "run.keep_last_n=0")]

    def job(name: str, *extra: str, **when) -> dict:
        return {"id": name, "argv": argv + list(extra), "cwd": str(ROOT), "out": str(tmp_path / f"{name}.out"),
                "err": str(tmp_path / f"{name}.err"), "timeout": 120, **when}
    first = cli_runner.run([job("first", signal={"signum": signal.SIGINT, "job": "second"}),
                            job("second", "run.resume=true", after={"path": str(run / "step_2")})])
    last = ckpt.latest_checkpoint(run)
    step = ckpt.read_trainer_state(last)["step"] if last else 0
    again = cli_runner.run([job("again", "run.resume=true",
                                signal={"signum": signal.SIGTERM, "path": str(run / f"step_{step + 2}")})])
    err = {name: (tmp_path / f"{name}.err").read_text() for name in ("first", "second", "again")}
    assert first["second"]["rc"] == 2 and err["second"].count("error:") == 1, err["second"][-2000:]
    assert f"in use by process {first['first']['pid']}" in err["second"]
    assert first["first"]["rc"] == 130 and "Traceback" not in err["first"], err["first"][-2000:]
    stop = [line for line in err["first"].splitlines() if "stopped:" in line]
    assert len(stop) == 1 and "stopped: SIGINT at step" in stop[0], err["first"][-2000:]
    assert f"the last checkpoint, {last}, is intact: continue with run.resume=true" in stop[0] and step >= 2
    assert again["again"]["rc"] == 143 and "Traceback" not in err["again"], err["again"][-2000:]
    assert err["again"].count("stopped: SIGTERM at step") == 1
    assert ckpt.read_trainer_state(ckpt.latest_checkpoint(run))["step"] >= step + 2
    assert not (run / ".lock").exists() and not (run / "final").exists()
