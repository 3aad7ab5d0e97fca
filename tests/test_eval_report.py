"""Reports: eval.json/Markdown/SVG written atomically; compare lines metrics up with deltas."""
import json
import xml.etree.ElementTree as ET

import pytest

from evaluation.report import compare_rows, load_result, write_compare, write_report
from model.errors import SFTError


def _result(model, acc, loss, strict):
    return {"model": model, "notes": ["pico-base has no chat template; prompts use 'alpaca'"],
            "tasks": {"loss": {"metrics": {"loss": loss, "ppl": 2.718 ** loss, "n_tokens": 100}},
                      "mc": {"metrics": {"acc": acc, "acc_norm": acc},
                             "tables": {"per subject": {"header": ["subject", "n", "acc"],
                                                        "rows": [["anatomy", 4, acc]]}}},
                      "ifeval": {"metrics": {"prompt_strict": strict}}}}


def test_report_writes_json_markdown_and_a_valid_svg_with_rates_and_loss_on_their_own_axes(tmp_path):
    res = _result("base", 0.25, 3.5, 0.1)
    paths = write_report(res, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == res
    md = paths["md"].read_text()
    assert "| mc.acc | 0.2500 |" in md and "## mc: per subject" in md and "no chat template" in md
    svg = ET.fromstring(paths["svg"].read_text())  # well-formed XML
    labels = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "mc.acc" in labels and "ifeval.prompt_strict" in labels
    assert "loss.n_tokens" not in labels                       # counts stay in the tables
    rates, loss = labels.index("accuracies and rates (0-1)"), labels.index("held-out loss (lower is better)")
    assert rates < labels.index("mc.acc") < loss < labels.index("loss.loss")  # loss: its own axis
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_compare_gives_deltas_and_knows_lower_loss_is_better(tmp_path):
    base, tuned = _result("base", 0.25, 3.5, 0.10), _result("tuned", 0.24, 2.0, 0.30)
    write_report(base, tmp_path / "a")
    write_report(tuned, tmp_path / "b")
    rows = {r[0]: r for r in compare_rows(load_result(tmp_path / "a"), load_result(tmp_path / "b/eval.json"))}
    assert rows["loss.loss"][3] == pytest.approx(-1.5) and rows["loss.loss"][4] == "better"
    assert rows["mc.acc"][3] == pytest.approx(-0.01) and rows["mc.acc"][4] == "worse"  # no count: no SE
    assert rows["ifeval.prompt_strict"][4] == "better"
    paths = write_compare(base, tuned, tmp_path / "cmp", "base", "tuned")
    assert "| loss.loss | 3.5000 | 2.0000 | -1.5000 | better |" in paths["md"].read_text()
    ET.fromstring(paths["svg"].read_text())


def test_compare_keeps_metrics_present_in_only_one_run():
    a = {"tasks": {"mc": {"metrics": {"acc": 0.3}}}}
    b = {"tasks": {"judge": {"metrics": {"win_rate": 0.6}}}}
    rows = {r[0]: r for r in compare_rows(a, b)}
    assert rows["mc.acc"][2] is None and rows["judge.win_rate"][1] is None


def test_load_result_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(SFTError, match="no eval.json"):
        load_result(tmp_path)
    (tmp_path / "eval.json").write_text("{broken")
    with pytest.raises(SFTError, match="not valid JSON"):
        load_result(tmp_path)
    (tmp_path / "eval.json").write_text('{"loss": 1}')
    with pytest.raises(SFTError, match="no 'tasks'"):
        load_result(tmp_path)


def test_compare_calls_a_change_within_two_standard_errors_noise():
    def run(acc, strict, n):
        return {"tasks": {"mc": {"metrics": {"acc": acc, "n_items": n}},
                          "ifeval": {"metrics": {"prompt_strict": strict, "n_prompts": 541}}}}
    rows = {r[0]: r[4] for r in compare_rows(run(0.216, 0.087, 1000), run(0.218, 0.20, 1000))}
    assert rows["mc.acc"] == "~ (noise)"          # +0.002 on 1000 items (SE ~0.018)
    assert rows["ifeval.prompt_strict"] == "better"
    rows = {r[0]: r[4] for r in compare_rows(run(0.20, 0.1, 40), run(0.30, 0.1, 40))}
    assert rows["mc.acc"] == "~ (noise)"          # +0.10 on 40 items is chance
    rows = {r[0]: r[4] for r in compare_rows(run(0.20, 0.1, 4000), run(0.30, 0.1, 4000))}
    assert rows["mc.acc"] == "better"
