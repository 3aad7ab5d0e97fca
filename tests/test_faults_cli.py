"""Bad inputs and faults through the real commands, as a new user would meet them (issue 15).

Each row below is one mistake or fault, built by fixtures: a copy of the tiny model with one file
edited, a bad data file or config, a run folder left by an earlier run (`prev`: a real finished
run with step_1/, step_2/ and final/), a lock held by a live process, a disk that fills up
(`pre`: Python run in the process first, which makes a write fail with ENOSPC). Each is run
through `python train.py`, `eval.py`, `demo.py`, `-m data.inspect` or `-m data.filter` in its
own process (tests/cli_forks.py: forked from a server that imported torch once) and must end:

    exit status 2, ONE `error:` line holding every `expect` word (the file, the key, what to do),
    no traceback, and every file the case made -- the user's model, data, config and the run
    folder -- byte for byte as it was (or, for `absent`, a path that must not exist after).

`classify` sorts a result into the categories of the issue: OK, traceback, unclear (wrong exit
status, several lines, or a line that does not name the place), silent (exit 0, or an output
such as final/ written from a run that learned nothing), data loss (a user's file changed).
`python tests/test_faults_cli.py` prints the counts per category (the table of issue 15).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # also run as a script (the table, at the end)
from test_bad_inputs import GOOD, OPENAI, edit_config, edit_json, edit_weights, jsonl, put  # noqa: E402
from cli_forks import run_faults, tally, tree_digest  # noqa: E402

DATA = ROOT / "data" / "quickstart" / "alpaca_300.jsonl"


@dataclasses.dataclass
class Ctx:
    """What a row's `make` gets: its own scratch folder and the shared, read-only fixtures."""
    tmp: Path
    tiny: Path      # a 2-layer random Llama with pico-base's tokenizer
    adapter: Path   # a LoRA adapter for it
    base: Path      # a finished run on it: config.toml, metrics.jsonl, step_1/, step_2/, final/
    pid: int        # a live process (the test's own): a lock it holds is not stale


@dataclasses.dataclass
class Fault:
    name: str
    make: Callable[[Ctx], list[str]]     # builds the inputs; returns argv after `python`
    expect: tuple[str, ...]              # words of the one error line ("a|b": either); {pid} filled in
    forbid: tuple[str, ...] = ()         # words it must not hold (advice that would lose data)
    absent: tuple[str, ...] = ()         # paths under tmp that must not exist afterwards
    unchanged: bool = True               # every file under tmp as it was
    pre: str | None = None               # Python run in the process before the command (faults)


# ----------------------------------------------------------------------------- builders


def train(c: Ctx, *extra: str, model: Path | None = None, data: Path | None = None) -> list[str]:
    """A 2-step run on the tiny model; the same settings as the `base` run, so it can resume."""
    return ["train.py", *RUN_ARGS, f"model.path={model or c.tiny}", f"data.train={data or DATA}",
            f"run.out_dir={c.tmp / 'out'}", *extra]


RUN_ARGS = ["run.name=r", "train.max_steps=2", "data.max_records=16", "data.max_seq_len=256",
            "train.batch_size=2", "eval.sample_prompts=0", "run.threads=1", "optim.warmup_steps=1",
            "run.save_every=1", "run.keep_last_n=0"]


def model(c: Ctx, *edits: Callable[[Path], None]) -> Path:
    folder = c.tmp / "model"
    if not folder.exists():
        shutil.copytree(c.tiny, folder)
    for edit in edits:
        edit(folder)
    return folder


def prev(c: Ctx, drop: tuple[str, ...] = ()) -> Path:
    """A finished earlier run in out/r (what overwrite or a new run must not destroy)."""
    run = c.tmp / "out" / "r"
    shutil.copytree(c.base, run)
    for name in drop:
        shutil.rmtree(run / name)
    return run


def data(c: Ctx, *records, name: str = "data.jsonl") -> Path:
    return put(c.tmp, name, jsonl(*records))


def with_weight(name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    return edit_weights(lambda t: {**t, name: fn(t[name].clone())})


def nan_at_0(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[0] = float("nan")
    return t


def small_vocab(folder: Path) -> None:
    """config.json and the embedding agree on 100 rows; the tokenizer has 4096 pieces."""
    edit_config(vocab_size=100)(folder)
    edit_weights(lambda t: {**t, "model.embed_tokens.weight": t["model.embed_tokens.weight"][:100].clone()})(folder)


def state(c: Ctx, step: int, edit: Callable[[dict], object]) -> None:
    """Rewrite out/r/step_N/trainer_state.pt as edit(state)."""
    path = c.tmp / "out" / "r" / f"step_{step}" / "trainer_state.pt"
    torch.save(edit(torch.load(path, weights_only=True)), path)


def resume(c: Ctx, *extra: str, data: Path | None = None) -> list[str]:
    """Resume the earlier run (from step_1, so a step remains to be done) with `extra` changed."""
    prev(c, ("step_2",))
    return train(c, "run.resume=true", *extra, data=data)


def state_fault(edit: Callable[[dict], object]):
    def make(c: Ctx) -> list[str]:
        argv = resume(c)
        state(c, 1, edit)
        return argv
    return make


def then(*steps):
    """Run the building steps in order (as arguments) and return the last one: the argv."""
    return steps[-1]


def first_param(s: dict) -> str:
    return sorted(s["optimizer"]["state"])[0]


def renamed_param(s: dict) -> dict:
    """The optimizer state of one parameter filed under a name the model does not have."""
    s["optimizer"]["state"]["model.nope.weight"] = s["optimizer"]["state"].pop(first_param(s))
    return s


def wrong_shape(s: dict) -> dict:
    s["optimizer"]["state"][first_param(s)]["exp_avg"] = torch.zeros(3)
    return s


def eval_(c: Ctx, *extra: str, model_dir: Path | None = None) -> list[str]:
    return ["eval.py", "--model", str(model_dir or c.tiny), "--out", str(c.tmp / "out"), "--threads", "1",
            *extra]


def inspect(c: Ctx, *extra: str) -> list[str]:
    return ["-m", "data.inspect", "--model", str(c.tiny), "--data", str(DATA), "--html",
            str(c.tmp / "out" / "i.html"), *extra]


def filt(c: Ctx, body: str, source: Path = DATA) -> list[str]:
    cfg = put(c.tmp, "filter.toml", f'input = "{source}"\noutput_dir = "{c.tmp / "out"}"\n{body}')
    return ["-m", "data.filter", "--config", str(cfg)]


def toml(c: Ctx, text: str) -> list[str]:
    cfg = put(c.tmp, "run.toml", text)
    return ["train.py", "--config", str(cfg), f"run.out_dir={c.tmp / 'out'}"]


def fifo(c: Ctx, name: str) -> Path:
    os.mkfifo(c.tmp / name)
    return c.tmp / name


def full_disk(where: str, what: str = "save") -> str:
    """Python for `pre`: writes whose path holds `where` fail with ENOSPC (torch.save of a
    trainer state, a model folder's weights, or a small file written through a temp file)."""
    return f"""
import errno, tempfile, torch
from training import checkpointing as ck
def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
if {what!r} == "save":
    real = torch.save
    torch.save = lambda obj, f, *a, **k: full() if {where!r} in str(f) else real(obj, f, *a, **k)
elif {what!r} == "weights":
    real = ck.save_weights
    ck.save_weights = lambda m, folder, *a, **k: full() if {where!r} in str(folder) else real(m, folder, *a, **k)
else:
    real = tempfile.mkstemp
    tempfile.mkstemp = lambda *a, **k: full() if {where!r} in k.get("prefix", "") else real(*a, **k)
"""


NO_MKDIR = """
import pathlib
real = pathlib.Path.mkdir
def mkdir(self, *a, **k):
    if "/out" in str(self):
        raise PermissionError(13, "Permission denied", str(self))
    return real(self, *a, **k)
pathlib.Path.mkdir = mkdir
"""

def bad_option(name: str, *overrides: str) -> Fault:
    """A run with `overrides`; the error names the key of the last one."""
    return Fault(name, lambda c: train(c, *overrides), (overrides[-1].split("=")[0],))


def changed_on_resume(name: str, *overrides: str) -> Fault:
    """A resume of the earlier run with `overrides` changed; the error lists each key."""
    return Fault(name, lambda c: resume(c, *overrides), tuple(o.split("=")[0] for o in overrides))


# ----------------------------------------------------------------------------- the corpus

A = GOOD
FAULTS = [
    # --- options of a run: types and ranges (training/config.py) ---
    bad_option("beta1_above_one", "optim.beta1=1.5"),
    bad_option("eps_negative", "optim.eps=-1"),
    bad_option("epochs_inf", "train.max_steps=0", "train.epochs=inf"),
    bad_option("lora_dropout_above_one", "model.finetune=lora", "lora.dropout=1.5"),
    bad_option("beta2_one", "optim.beta2=1"),
    bad_option("lr_nan", "optim.lr=nan"),
    bad_option("lr_inf", "optim.lr=inf"),
    bad_option("min_lr_ratio_two", "optim.min_lr_ratio=2"),
    bad_option("grad_clip_negative", "optim.grad_clip=-1"),
    bad_option("grad_accum_zero", "train.grad_accum=0"),
    bad_option("max_steps_a_float", "train.max_steps=1.5"),
    bad_option("seed_negative", "run.seed=-1"),
    bad_option("resume_the_string_false", 'run.resume="false"'),
    Fault("toml_bool_as_string", lambda c: toml(c, '[run]\noverwrite = "false"\n'), ("run.toml", "run.overwrite")),
    Fault("toml_epochs_nan", lambda c: toml(c, "[train]\nmax_steps = 0\nepochs = nan\n"), ("run.toml", "train.epochs")),
    bad_option("run_name_with_a_slash", "run.name=a/b"),
    bad_option("device_not_a_choice", "run.device=tpu"),
    bad_option("dtype_not_a_choice", "model.dtype=fp16"),
    bad_option("max_seq_len_4", "data.max_seq_len=4"),
    Fault("max_seq_len_beyond_the_model", lambda c: train(c, "data.max_seq_len=1024"),
          ("data.max_seq_len", "max_position_embeddings")),
    bad_option("eval_fraction_one", "data.eval_fraction=1"),
    bad_option("eval_max_new_tokens_zero", "eval.max_new_tokens=0"),
    bad_option("template_unknown", "data.template=chatml2"),
    bad_option("loss_on_not_a_choice", "data.loss_on=everything"),
    Fault("lora_targets_match_nothing", lambda c: train(c, "model.finetune=lora", "lora.targets=['nope']"),
          ("targets", "nope")),
    Fault("resume_and_overwrite_together", lambda c: then(prev(c), train(c, "run.resume=true", "run.overwrite=true")),
          ("run.resume", "run.overwrite")),
    Fault("the_demo_config_given_to_train_py", lambda c: ["train.py", "--config", str(ROOT / "configs" / "demo.toml"),
                                                         f"run.out_dir={c.tmp / 'out'}"], ("demo.toml", "demo.py")),
    Fault("demo_option_out_of_range", lambda c: ["demo.py", "demo.texts_per_topic=0", f"run.out_dir={c.tmp / 'out'}"],
          ("demo.texts_per_topic",)),
    # --- the model folder ---
    Fault("config_rms_norm_eps_a_string", lambda c: train(c, model=model(c, edit_config(rms_norm_eps="1e-5"))),
          ("config.json", "rms_norm_eps")),
    Fault("config_rope_theta_a_word", lambda c: train(c, model=model(c, edit_config(rope_theta="big"))),
          ("config.json", "rope_theta")),
    Fault("config_rope_factor_a_string", lambda c: train(c, model=model(c, edit_config(
        rope_scaling={"rope_type": "linear", "factor": "2"}))), ("config.json", "factor")),
    Fault("config_tie_embeddings_a_string", lambda c: train(c, model=model(c, edit_config(tie_word_embeddings="false"))),
          ("config.json", "tie_word_embeddings")),
    Fault("config_model_type_unknown", lambda c: train(c, model=model(c, edit_config(
        model_type="gpt2", architectures=["GPT2LMHeadModel"]))), ("config.json", "GPT2LMHeadModel|gpt2")),
    Fault("config_heads_a_string", lambda c: train(c, model=model(c, edit_config(num_attention_heads="4"))),
          ("config.json", "num_attention_heads")),
    Fault("config_json_a_list", lambda c: train(c, model=model(c, lambda f: put(f, "config.json", "[]"))),
          ("config.json",)),
    Fault("vocab_smaller_than_tokenizer", lambda c: train(c, model=model(c, small_vocab)), ("config.json", "vocab_size")),
    Fault("nan_in_a_norm_weight", lambda c: train(c, model=model(c, with_weight("model.norm.weight", nan_at_0))),
          ("nan|NaN",), absent=("out/r/final",)),
    Fault("huge_norm_weight_overflows_every_step", lambda c: train(c, model=model(c, with_weight(
        "model.layers.0.input_layernorm.weight", lambda t: t * 1e30))), ("skipped",), absent=("out/r/final",)),
    Fault("tokenizer_model_a_directory", lambda c: train(c, model=model(
        c, lambda f: (f / "tokenizer.model").unlink() or (f / "tokenizer.model").mkdir())),
          ("tokenizer.model", "directory")),
    Fault("tokenizer_model_empty", lambda c: train(c, model=model(c, lambda f: put(f, "tokenizer.model", b""))),
          ("tokenizer.model",)),
    Fault("tokenizer_json_garbage_alone", lambda c: train(c, model=model(
        c, lambda f: (f / "tokenizer.model").unlink() or put(f, "tokenizer.json", "{}"))), ("tokenizer.json",)),
    Fault("tokenizer_config_a_list", lambda c: train(c, model=model(c, lambda f: put(f, "tokenizer_config.json", "[1]"))),
          ("tokenizer_config.json",)),
    Fault("special_tokens_map_invalid", lambda c: train(c, model=model(
        c, lambda f: put(f, "special_tokens_map.json", '{"eos_token": '))), ("special_tokens_map.json",)),
    Fault("added_tokens_json_a_list", lambda c: train(c, model=model(c, lambda f: put(f, "added_tokens.json", '["x"]'))),
          ("added_tokens.json",)),
    Fault("chat_template_we_do_not_reproduce", lambda c: train(c, model=model(
        c, edit_json("tokenizer_config.json", chat_template="{{ messages }}"))),
          ("tokenizer_config.json", "data.template=")),
    Fault("model_path_missing", lambda c: train(c, model=c.tmp / "nope"), ("nope",)),
    Fault("model_path_a_file", lambda c: train(c, model=put(c.tmp, "model.bin", "x")), ("model.bin",)),
    # --- the data ---
    Fault("every_answer_truncated_away", lambda c: train(c, data=data(c, *[{**A, "instruction": "word " * 400}] * 8)),
          ("data.jsonl", "data.max_seq_len")),
    Fault("output_null", lambda c: train(c, data=data(c, {**A, "output": None}, A)), ("data.jsonl:1", "output")),
    Fault("eval_file_missing", lambda c: train(c, f"data.eval={c.tmp / 'nope.jsonl'}"), ("nope.jsonl",)),
    Fault("eval_file_bad_line", lambda c: train(c, f"data.eval={data(c, A, '{', name='eval.jsonl')}"), ("eval.jsonl:2",)),
    Fault("format_says_sharegpt_for_alpaca", lambda c: train(c, "data.format=sharegpt"), ("alpaca_300.jsonl",)),
    Fault("json_array_with_trailing_garbage", lambda c: train(c, data=put(c.tmp, "data.json", json.dumps([A]) + "]")),
          ("data.json",)),
    Fault("data_is_a_fifo", lambda c: train(c, data=fifo(c, "data.jsonl")), ("data.jsonl",)),
    bad_option("data_train_empty", "data.train=''"),
    Fault("data_is_a_weights_file", lambda c: train(c, data=c.tiny / "model.safetensors"), ("model.safetensors",)),
    Fault("message_with_an_image", lambda c: train(c, data=data(c, {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
        {"role": "assistant", "content": "x"}]}, *[OPENAI] * 3)),
          ("data.jsonl:1", "image_url")),
    # --- the run folder: never destroyed before its replacement is good ---
    Fault("overwrite_with_beta1_above_one_keeps_the_previous_run",
          lambda c: then(prev(c), train(c, "run.overwrite=true", "optim.beta1=1.5")), ("optim.beta1",)),
    Fault("overwrite_with_a_small_vocab_model_keeps_the_previous_run",
          lambda c: then(prev(c), train(c, "run.overwrite=true", model=model(c, small_vocab))), ("vocab_size",)),
    Fault("overwrite_with_nan_weights_keeps_the_previous_run", lambda c: then(prev(c), train(
        c, "run.overwrite=true", model=model(c, with_weight("model.norm.weight", nan_at_0)))), ("nan|NaN",)),
    Fault("overwrite_with_lr_1e9_keeps_the_previous_run", lambda c: then(prev(c), train(
        c, "run.overwrite=true", "optim.lr=1e9", "optim.warmup_steps=0", "run.save_every=0")), ("optim.lr",)),
    Fault("overwrite_when_the_disk_fills_at_the_first_checkpoint_keeps_the_previous_run",
          lambda c: then(prev(c), train(c, "run.overwrite=true")), ("step_1", "No space left"), pre=full_disk("step_1")),
    Fault("overwrite_when_config_toml_cannot_be_written_keeps_the_previous_run",
          lambda c: then(prev(c), train(c, "run.overwrite=true")), ("config.toml", "No space left"),
          pre=full_disk("config.toml", "small")),
    Fault("lr_1e9_diverges", lambda c: train(c, "optim.lr=1e9", "optim.warmup_steps=0", "run.save_every=0"),
          ("optim.lr",), absent=("out/r/final",)),
    Fault("a_finished_run_is_not_offered_resume", lambda c: then(prev(c, ("step_1", "step_2")), train(c)),
          ("final", "run.overwrite=true"), forbid=("run.resume=true",)),
    Fault("resume_of_a_finished_run_without_checkpoints", lambda c: then(prev(c, ("step_1", "step_2")), train(
        c, "run.resume=true")), ("step_", "run.overwrite=true")),
    Fault("a_run_with_checkpoints_needs_resume_or_overwrite", lambda c: then(prev(c), train(c)), ("run.resume=true",)),
    Fault("a_lock_file_that_is_not_ours", lambda c: then(put(c.tmp / "out" / "r", ".lock", "garbage"), train(c)),
          (".lock", "delete it")),
    Fault("a_second_run_on_a_locked_folder", lambda c: then(put(c.tmp / "out" / "r", ".lock", json.dumps(
        {"pid": c.pid, "host": os.uname().nodename})), train(c)), ("{pid}", ".lock")),
    Fault("overwrite_while_an_earlier_replacement_is_kept", lambda c: then(prev(c), shutil.copytree(
        c.base, c.tmp / "out" / "r.previous"), train(c, "run.overwrite=true")), ("r.previous",)),
    Fault("out_dir_is_a_file", lambda c: train(c, f"run.out_dir={put(c.tmp, 'outfile', 'x')}"), ("outfile",)),
    Fault("out_dir_not_writable", lambda c: train(c), ("out", "Permission denied"), pre=NO_MKDIR),
    Fault("disk_full_at_the_second_checkpoint", lambda c: train(c), ("step_2", "No space left"), unchanged=False,
          absent=("out/r/final", "out/r/.tmp-step_2"), pre=full_disk("step_2")),
    Fault("disk_full_writing_final", lambda c: train(c, "run.save_every=0"), ("final", "No space left"),
          pre=full_disk(".tmp-final", "weights")),
    # --- resume: exact or refused ---
    changed_on_resume("resume_with_another_lr", "optim.lr=1e-2"),
    changed_on_resume("resume_with_another_batch_size", "train.batch_size=4"),
    changed_on_resume("resume_with_another_grad_accum", "train.grad_accum=2"),
    changed_on_resume("resume_with_another_max_seq_len", "data.max_seq_len=128"),
    changed_on_resume("resume_with_another_seed", "run.seed=1"),
    changed_on_resume("resume_with_another_warmup", "optim.warmup_steps=5"),
    changed_on_resume("resume_with_more_steps", "train.max_steps=3"),
    changed_on_resume("resume_with_lora", "model.finetune=lora"),
    Fault("resume_with_an_edited_data_file", lambda c: resume(c, data=put(
        c.tmp, "d.jsonl", DATA.read_text().replace("a", "b", 1))), ("data.train",)),
    changed_on_resume("resume_with_two_changes_lists_both", "optim.lr=1e-2", "train.batch_size=4"),
    # --- the trainer state of a checkpoint ---
    Fault("state_without_optimizer", state_fault(lambda s: {k: v for k, v in s.items() if k != "optimizer"}),
          ("trainer_state.pt", "optimizer")),
    Fault("state_step_a_string", state_fault(lambda s: {**s, "step": "1"}), ("trainer_state.pt", "step")),
    Fault("state_step_beyond_the_run", state_fault(lambda s: {**s, "step": 99}), ("trainer_state.pt", "99")),
    Fault("state_optimizer_for_another_parameter", state_fault(renamed_param), ("trainer_state.pt", "model.nope.weight")),
    Fault("state_optimizer_wrong_shape", state_fault(wrong_shape), ("trainer_state.pt", "shape")),
    Fault("state_scheduler_a_string", state_fault(lambda s: {**s, "scheduler": "x"}), ("trainer_state.pt", "scheduler")),
    Fault("state_rng_garbage", state_fault(lambda s: {**s, "rng": {"python": 1}}), ("trainer_state.pt", "rng")),
    Fault("state_not_a_dict", state_fault(lambda s: [1, 2]), ("trainer_state.pt",)),
    Fault("state_truncated_and_no_older_checkpoint", lambda c: then(argv := resume(c), put(
        c.tmp / "out" / "r" / "step_1", "trainer_state.pt", b"PK\x03\x04"), argv), ("step_1", "trainer_state.pt")),
    Fault("checkpoint_weights_truncated_and_no_older_one", lambda c: then(argv := resume(c), put(
        c.tmp / "out" / "r" / "step_1", "model.safetensors", b"\x10" + bytes(7)), argv), ("step_1", "model.safetensors")),
    # --- eval.py ---
    Fault("eval_limit_zero", lambda c: eval_(c, "--limit", "0"), ("--limit",)),
    Fault("eval_batch_size_negative", lambda c: eval_(c, "--batch-size", "-1"), ("--batch-size",)),
    Fault("eval_max_new_tokens_beyond_the_context", lambda c: eval_(c, "--tasks", "samples", "--max-new-tokens",
                                                                    "100000"), ("--max-new-tokens",)),
    Fault("eval_k_shot_negative", lambda c: eval_(c, "--k-shot", "-1"), ("--k-shot",)),
    Fault("eval_max_len_2", lambda c: eval_(c, "--max-len", "2"), ("--max-len",)),
    Fault("eval_judge_timeout_zero", lambda c: eval_(c, "--judge-timeout", "0"), ("--judge-timeout",)),
    Fault("eval_dtype_not_a_choice", lambda c: eval_(c, "--dtype", "fp8"), ("--dtype",)),
    Fault("eval_task_unknown", lambda c: eval_(c, "--tasks", "loss,vibes", "--data", str(DATA)), ("--tasks", "vibes")),
    Fault("eval_loss_without_data", lambda c: eval_(c, "--tasks", "loss"), ("--data",)),
    Fault("eval_judge_without_a_judge", lambda c: eval_(c, "--tasks", "judge", "--reference", str(DATA)), ("--judge",)),
    Fault("eval_template_unknown", lambda c: eval_(c, "--tasks", "samples", "--template", "nope"), ("--template",)),
    Fault("eval_model_missing", lambda c: eval_(c, model_dir=c.tmp / "nope"), ("nope",)),
    Fault("eval_model_is_an_adapter", lambda c: eval_(c, "--tasks", "samples", model_dir=c.adapter), ("--adapter",)),
    Fault("eval_tokenizer_model_a_directory", lambda c: eval_(c, "--tasks", "samples", model_dir=model(
        c, lambda f: (f / "tokenizer.model").unlink() or (f / "tokenizer.model").mkdir())), ("tokenizer.model",)),
    Fault("eval_vocab_smaller_than_tokenizer", lambda c: eval_(c, "--tasks", "samples", model_dir=model(c, small_vocab)),
          ("config.json", "vocab_size")),
    Fault("eval_out_is_a_file", lambda c: ["eval.py", "--model", str(c.tiny), "--out", str(put(c.tmp, "outfile", "x")),
                                           "--tasks", "samples", "--samples", "1", "--max-new-tokens", "2"], ("outfile",)),
    Fault("eval_mc_data_bad_line", lambda c: eval_(c, "--tasks", "mc", "--mc-data", str(data(c, "{", name="mc.jsonl"))),
          ("mc.jsonl:1",)),
    Fault("eval_ifeval_data_missing", lambda c: eval_(c, "--tasks", "ifeval", "--ifeval-data", str(c.tmp / "nope.jsonl")),
          ("nope.jsonl",)),
    Fault("chat_top_p_above_one", lambda c: ["eval.py", "chat", "--model", str(c.tiny), "--top-p", "1.5"], ("--top-p",)),
    Fault("chat_temperature_negative", lambda c: ["eval.py", "chat", "--model", str(c.tiny), "--temperature", "-1"],
          ("--temperature",)),
    Fault("compare_of_missing_reports", lambda c: ["eval.py", "compare", str(c.tmp / "a"), str(c.tmp / "b")], ("eval.json",)),
    Fault("compare_with_one_name", lambda c: ["eval.py", "compare", "a", "b", "--names", "one"], ("--names",)),
    # --- data.inspect and data.filter ---
    Fault("inspect_max_len_zero", lambda c: inspect(c, "--max-len", "0"), ("--max-len|data.max_seq_len",)),
    Fault("inspect_n_zero", lambda c: inspect(c, "-n", "0"), ("-n",)),
    Fault("inspect_index_beyond_the_file", lambda c: inspect(c, "--index", "5000"), ("--index", "300")),
    Fault("inspect_index_negative", lambda c: inspect(c, "--index", "-1"), ("--index",)),
    Fault("inspect_index_not_a_number", lambda c: inspect(c, "--index", "two"), ("--index",)),
    Fault("inspect_strategy_unknown", lambda c: inspect(c, "--strategy", "all"), ("--strategy|data.loss_on",)),
    Fault("inspect_html_inside_a_file", lambda c: inspect(c)[:-2] + ["--html", str(put(c.tmp, "f", "x") / "i.html")],
          ("i.html",)),
    Fault("filter_input_missing", lambda c: filt(c, '[[filters]]\ntype = "exact_dedup"\n', c.tmp / "nope.jsonl"),
          ("nope.jsonl",)),
    Fault("filter_threshold_above_one", lambda c: filt(c, '[[filters]]\ntype = "near_dedup"\nthreshold = 1.5\n'),
          ("filter.toml", "threshold")),
    Fault("filter_without_type", lambda c: filt(c, '[[filters]]\nthreshold = 0.5\n'), ("filter.toml", "type")),
    Fault("filter_output_dir_a_file", lambda c: ["-m", "data.filter", "--config", str(put(
        c.tmp, "filter.toml", f'input = "{DATA}"\noutput_dir = "{put(c.tmp, "outfile", "x")}"\n'
        '[[filters]]\ntype = "exact_dedup"\n'))], ("outfile",)),
    Fault("filter_config_missing", lambda c: ["-m", "data.filter", "--config", str(c.tmp / "nope.toml")], ("nope.toml",)),
]

# ----------------------------------------------------------------------------- running and judging


@pytest.fixture(scope="session")
def base_run(tiny_dir, tmp_path_factory) -> Path:
    """A finished 2-step run on the tiny model, checkpointed at each step (what cases copy)."""
    from training.config import load_config
    from training.loop import train as run_training
    out = tmp_path_factory.mktemp("base_run")
    args = [a for a in RUN_ARGS if not a.startswith("run.name")]
    run_training(load_config(None, [*args, f"model.path={tiny_dir}", f"data.train={DATA}", f"run.out_dir={out}",
                                    "run.name=base"]))
    return out / "base"


@pytest.fixture(scope="module")
def results(cli_runner, tiny_dir, adapter_dir, base_run, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("faults")
    logs = root / "logs"
    logs.mkdir()

    def ctx_for(name: str) -> Ctx:
        (root / name).mkdir(exist_ok=True)
        return Ctx(root / name, tiny_dir, adapter_dir, base_run, os.getpid())
    shared = {p: tree_digest(p) for p in (tiny_dir, adapter_dir, base_run, DATA)}
    out = run_faults(cli_runner, FAULTS, ctx_for, logs)
    assert {p: tree_digest(p) for p in shared} == shared, "a shared fixture (the user's files) changed"
    if os.environ.get("SFT_FAULTS_TABLE"):  # for the table (see the end of this file)
        Path(os.environ["SFT_FAULTS_TABLE"]).write_text(json.dumps(
            {k: {"category": v["category"], "rc": v["rc"], "seconds": v["seconds"], "err": v["err"][-1500:]}
             for k, v in out.items()}))
    return out


def test_the_corpus_holds_at_least_80_faults_with_unique_names():
    names = [f.name for f in FAULTS]
    assert len(names) >= 80 and len(set(names)) == len(names)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_a_fault_ends_in_one_line_exit_2_and_nothing_lost(fault, results):
    r = results[fault.name]
    assert r["category"] == "OK", (f"{r['category']}: exit {r['rc']}; changed or removed {r['lost'][:5]}; left "
                                   f"{r['left'][:5]}; present {r['present']}\n{r['err'][-3000:]}")


if __name__ == "__main__":  # the table for this checkout: python tests/test_faults_cli.py [OUT.json]
    table = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/faults_table.json")
    subprocess.call([sys.executable, "-m", "pytest", "-q", __file__, "-p", "no:cacheprovider", "-k",
                     "a_fault_ends", "--tb=no", "-q"], env=dict(os.environ, SFT_FAULTS_TABLE=str(table)))
    found = json.loads(table.read_text())
    for name, r in sorted(found.items()):
        print(f"{r['category']:<10} {r['rc']!s:>7} {r['seconds']:6.1f}s {name}")
    print(json.dumps({**tally(found), "n": len(found)}))
