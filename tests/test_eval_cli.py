"""eval.py as a user meets it: bad input is one clear line and exit 2; a small run writes a report;
compare and chat work."""
import io
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

import eval as eval_cli
from model.errors import SFTError

ROOT = Path(__file__).resolve().parents[1]


def test_missing_model_folder_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(tmp_path / "nope"),
                           "--tasks", "mc"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "eval.py: error:" in proc.stderr and "not a model folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "mc,bogus"], "unknown task(s) ['bogus']"),
    (["--tasks", "loss"], "--tasks loss needs --data"),
    (["--tasks", "mc", "--limit", "0"], "--limit 0"),
    (["--tasks", "ifeval", "--ifeval-data", "/no/such.jsonl"], "IFEval file not found"),
    (["--tasks", "mc", "--mc-style", "words"], "--mc-style 'words'"),
    (["--tasks", "judge"], "needs exactly one opponent"),
])
def test_bad_options_exit_2_naming_the_problem(pico_dir, capsys, argv, message):
    assert eval_cli.main(["--model", str(pico_dir)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 2  # the template note, then the error


def test_debug_flag_shows_the_exception(pico_dir):
    with pytest.raises(SFTError):
        eval_cli.main(["--model", str(pico_dir), "--tasks", "nope", "--debug"])


def test_compare_of_missing_results_exits_2(tmp_path, capsys):
    assert eval_cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "no eval.json found" in capsys.readouterr().err


def test_small_run_writes_report_with_template_note_and_compares_to_itself(pico_dir, shared_file, tmp_path, capsys):
    data = shared_file("data/llamafactory_alpaca_en_demo.json")
    out = tmp_path / "ev"
    code = eval_cli.main(["--model", str(pico_dir), "--data", str(data), "--tasks", "loss,samples,ifeval,mc",
                          "--limit", "2", "--max-new-tokens", "4", "--samples", "1", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "eval.json").read_text())
    assert set(res["tasks"]) == {"loss", "samples", "ifeval", "mc"}
    assert res["template"] == "alpaca" and "no chat template" in res["notes"][0]
    assert res["tasks"]["loss"]["metrics"]["loss"] > 0 and res["tasks"]["mc"]["metrics"]["n_items"] == 2
    assert res["tasks"]["ifeval"]["metrics"]["n_prompts"] == 2
    assert len(res["tasks"]["samples"]["samples"]) == 1
    assert (out / "eval.md").is_file() and (out / "eval.svg").is_file()
    capsys.readouterr()
    assert eval_cli.main(["compare", str(out), str(out / "eval.json"), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "| loss.loss |" in text and "| 0.0000 |" in text
    assert (tmp_path / "cmp" / "compare.svg").is_file()


def test_chat_loop_streams_replies_and_keeps_history(pico_dir):
    from evaluation.generation import load_eval_model
    em = load_eval_model(pico_dir)
    lines = iter(["Hello there", "/reset", "Tell me a story", "/exit"])
    out = io.StringIO()
    args = Namespace(system=None, max_new_tokens=6, temperature=0.0, top_p=1.0)
    conv = eval_cli.chat_loop(em, args, read=lambda _: next(lines), out=out)
    assert [m["role"] for m in conv] == ["user", "assistant"]  # /reset dropped the first exchange
    assert conv[0]["content"] == "Tell me a story" and conv[1]["content"]
    assert out.getvalue().count("bot> ") == 2 and "(conversation reset)" in out.getvalue()


def test_adapter_is_applied_on_top_of_the_base_model(pico_dir, tmp_path, capsys):
    import torch

    from evaluation.generation import load_eval_model
    from evaluation.mc import score_continuations
    from lora import apply_lora, lora_layers, save_adapter
    from model import load_pretrained
    model = apply_lora(load_pretrained(pico_dir), r=4, targets=("q_proj", "v_proj"))
    torch.manual_seed(0)
    for layer in lora_layers(model).values():  # a non-zero B, so the adapter changes the outputs
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_adapter(model, tmp_path / "adapter")
    pair = [("Once upon a time there was a", " king")]
    base = load_eval_model(pico_dir)
    tuned = load_eval_model(pico_dir, adapter=tmp_path / "adapter")
    with torch.no_grad():
        expected = score_continuations(model.eval(), base.tokenizer, pair)
    assert score_continuations(tuned.model, tuned.tokenizer, pair) == pytest.approx(expected, abs=1e-4)
    assert score_continuations(base.model, base.tokenizer, pair) != pytest.approx(expected, abs=1e-3)
    assert eval_cli.main(["--model", str(pico_dir), "--adapter", str(tmp_path / "none"), "--tasks", "mc"]) == 2
    assert "adapter folder not found" in capsys.readouterr().err
