"""Bad input through the real commands: exit status 2, one line, no traceback, no partial output.

The library half of the corpus is tests/test_bad_inputs.py; here a representative subset goes
through `python train.py`, `python eval.py`, `python -m data.inspect`, `python -m data.filter` and
`python -m data.synth` in subprocesses. Each case names what the one `error:` line must contain
and which paths must be absent, or byte-for-byte unchanged, afterwards (a failed run must not
leave a half-made run folder, nor clear an old one on `run.overwrite=true`). One case passes
`--debug` and gets the traceback instead. The cases run in one module fixture as processes
forked from a server that imported torch once (tests/cli_forks.py; a fresh interpreter pays
seconds for the import), two at a time. tests/test_faults_cli.py holds the larger corpus.

A FIFO stands in for an unreadable file here: the tests run as root, which ignores `chmod 000`,
and a FIFO is the other kind of path a user can name that is not a readable regular file
(opening one blocks forever, so it must be refused before it is opened).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from cli_forks import tree_digest
from test_bad_inputs import CASES, GOOD, edit_json, jsonl, put

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class CliCase:
    name: str
    make: Callable[[Path, Path, Path], list[str]]   # (tmp, tiny model, adapter) -> argv after `python`
    expect: tuple[str, ...]                          # words the one error line must contain
    untouched: tuple[str, ...] = ("out",)            # paths under tmp that must be absent or unchanged
    debug: bool = False                              # --debug: the traceback is shown instead


def train_argv(tmp: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return ["train.py", f"model.path={model}", f"data.train={data}", f"run.out_dir={tmp / 'out'}",
            "run.name=r", "train.max_steps=1", "data.max_records=8", "data.max_seq_len=64",
            "train.batch_size=2", "eval.sample_prompts=0", "run.threads=1", *extra]


def good_data(tmp: Path) -> Path:
    return put(tmp, "good.jsonl", jsonl(*[GOOD] * 8))


def bad_line_data(tmp: Path) -> Path:
    return put(tmp, "data.jsonl", jsonl(GOOD, GOOD, '{"instruction": "x", "output": '))


def previous_run(tmp: Path) -> None:
    """A finished run's folder (what overwrite=true would replace)."""
    run = tmp / "out" / "r"
    put(run, "final/config.json", "{}")
    put(run, "step_1/trainer_state.pt", b"state")
    put(run, "metrics.jsonl", jsonl({"kind": "train", "step": 1, "loss": 1.0}))


def _fifo(tmp: Path, name: str) -> Path:
    path = tmp / name
    os.mkfifo(path)
    return path


def _no_tokenizer(tmp: Path, tiny: Path) -> Path:
    folder = tmp / "model_dir"
    shutil.copytree(tiny, folder)
    (folder / "tokenizer.model").unlink()
    return folder


def _truncated_weights(tmp: Path, tiny: Path) -> Path:
    folder = tmp / "model_dir"
    shutil.copytree(tiny, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _bad_adapter(tmp: Path, adapter: Path) -> Path:
    folder = tmp / "adapter_dir"
    shutil.copytree(adapter, folder)
    edit_json("adapter_config.json", r=2)(folder)
    return folder


def _filter_config(tmp: Path, data: Path, steps: str) -> Path:
    return put(tmp, "filter.toml", f'input = "{data}"\noutput_dir = "{tmp / "out"}"\n{steps}')


def _cli_prev(tmp, tiny, adapter):
    previous_run(tmp)
    return train_argv(tmp, tiny, bad_line_data(tmp), "run.overwrite=true")


CLI_CASES = [
    CliCase("cli_train_malformed_jsonl_line", lambda t, m, a: train_argv(t, m, bad_line_data(t)),
            ("data.jsonl:3",)),
    CliCase("cli_train_debug_shows_traceback", lambda t, m, a: train_argv(t, m, bad_line_data(t), "--debug"),
            ("data.jsonl:3",), debug=True),
    CliCase("cli_train_latin1_data", lambda t, m, a: train_argv(t, m, put(
        t, "data.jsonl", '{"instruction": "café", "output": "x"}\n'.encode("latin-1"))), ("data.jsonl:1",)),
    CliCase("cli_train_data_is_a_directory",
            lambda t, m, a: train_argv(t, m, (t / "data.jsonl").mkdir() or t / "data.jsonl"),
            ("data.jsonl", "directory")),
    CliCase("cli_train_toml_typo", lambda t, m, a: ["train.py", "--config", str(put(
        t, "run.toml", f'[run]\nout_dir = "{t / "out"}"\n[optim]\nweight_decy = 0.1\n'))],
            ("run.toml", "optim.weight_decay")),
    CliCase("cli_train_override_wrong_type", lambda t, m, a: train_argv(t, m, good_data(t), "train.batch_size=two"),
            ("train.batch_size",)),
    CliCase("cli_train_config_is_a_fifo", lambda t, m, a: ["train.py", "--config", str(_fifo(t, "run.toml"))],
            ("run.toml",)),
    CliCase("cli_train_missing_tokenizer", lambda t, m, a: train_argv(t, _no_tokenizer(t, m), good_data(t)),
            ("tokenizer.model", "missing")),
    CliCase("cli_train_lora_rank_zero",
            lambda t, m, a: train_argv(t, m, good_data(t), "model.finetune=lora", "lora.r=0"),
            ("lora.r",)),
    CliCase("cli_train_overwrite_with_bad_data_keeps_previous_run", _cli_prev, ("data.jsonl:3",)),
    CliCase("cli_eval_truncated_weights", lambda t, m, a: ["eval.py", "--model", str(_truncated_weights(t, m)),
                                                           "--tasks", "samples", "--out", str(t / "out")],
            ("model.safetensors",)),
    CliCase("cli_eval_adapter_mismatch",
            lambda t, m, a: ["eval.py", "--model", str(m), "--adapter", str(_bad_adapter(t, a)),
                             "--tasks", "samples", "--out", str(t / "out")],
            ("adapter_model.safetensors", "shape")),
    CliCase("cli_eval_bad_data_line", lambda t, m, a: ["eval.py", "--model", str(m), "--data", str(bad_line_data(t)),
                                                       "--tasks", "loss", "--out", str(t / "out")],
            ("data.jsonl:3",)),
    CliCase("cli_inspect_utf16_data", lambda t, m, a: ["-m", "data.inspect", "--model", str(m), "--data", str(
        put(t, "data.jsonl", jsonl(GOOD).encode("utf-16"))), "--html", str(t / "out" / "i.html")],
            ("data.jsonl", "UTF-8")),
    CliCase("cli_filter_unknown_filter_type_in_step_2", lambda t, m, a: ["-m", "data.filter", "--config", str(
        _filter_config(t, good_data(t), '[[filters]]\ntype = "exact_dedup"\n[[filters]]\ntype = "fuzzy"\n'))],
            ("filter.toml", "fuzzy")),
    CliCase("cli_synth_bad_toml", lambda t, m, a: ["-m", "data.synth", "--config", str(
        put(t, "synth.toml", f'output_dir = "{t / "out"}"\n[teacher]\nmodel_dir = = 1\n'))], ("synth.toml", "line 3")),
    CliCase("cli_filter_malformed_input_line", lambda t, m, a: ["-m", "data.filter", "--config", str(
        _filter_config(t, bad_line_data(t), '[[filters]]\ntype = "exact_dedup"\n'))], ("data.jsonl", "3")),
]


@pytest.fixture(scope="module")
def cli_results(cli_runner, tiny_dir, adapter_dir, tmp_path_factory) -> dict[str, dict]:
    """Run every CLI case once, as forked processes of the server that imported torch once
    (tests/cli_forks.py); a hang (e.g. opening a FIFO) ends in a timeout, a failure too."""
    base = tmp_path_factory.mktemp("cli")
    jobs, before = [], {}
    for c in CLI_CASES:
        (base / c.name).mkdir()
        argv = c.make(base / c.name, tiny_dir, adapter_dir)
        before[c.name] = {u: tree_digest(base / c.name / u) for u in c.untouched}
        jobs.append({"id": c.name, "argv": argv, "cwd": str(ROOT), "out": str(base / f"{c.name}.out"),
                     "err": str(base / f"{c.name}.err"), "timeout": 180})
    codes = cli_runner.run(jobs)
    return {c.name: {"rc": codes[c.name]["rc"], "stderr": (base / f"{c.name}.err").read_text(),
                     "before": before[c.name],
                     "after": {u: tree_digest(base / c.name / u) for u in c.untouched}} for c in CLI_CASES}


def test_the_corpus_has_at_least_40_cases_with_unique_names():
    names = [c.name for c in CASES] + [c.name for c in CLI_CASES]
    assert len(names) >= 40 and len(set(names)) == len(names) and len(CLI_CASES) >= 10


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_cli_exits_2_with_one_line_and_no_partial_output(case, cli_results):
    r = cli_results[case.name]
    err = r["stderr"]
    if case.debug:
        assert r["rc"] not in (0, 2, "timeout") and "Traceback" in err and "SFTError" in err, err[-2000:]
    else:
        assert r["rc"] == 2, f"exit status {r['rc']}; stderr:\n{err[-2000:]}"
        assert "Traceback" not in err, err[-2000:]
        lines = [l for l in err.splitlines() if "error:" in l]
        assert len(lines) == 1, err[-2000:]
        for part in case.expect:
            assert part in lines[0], f"{part!r} not in: {lines[0]}"
    assert r["after"] == r["before"], f"output changed: {r['before']} -> {r['after']}"
