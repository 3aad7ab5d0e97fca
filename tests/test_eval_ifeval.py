"""IFEval scoring on fixed responses: prompt/instruction level, strict/loose, per-type table."""
import json

import pytest

from evaluation.ifeval import load_ifeval, score_responses
from model.errors import SFTError

ITEMS = [
    {"key": 1, "prompt": "p1", "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
     "kwargs": [{}, {}]},
    {"key": 2, "prompt": "p2", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 3, "prompt": "p3", "instruction_id_list": ["startend:end_checker", "change_case:english_lowercase"],
     "kwargs": [{"end_phrase": "Any other questions?"}, {}]},
]
RESPONSES = [
    "hello world",                              # both followed
    "Sure, here it is:\nno commas here",        # comma only in a preamble line: loose passes
    "Done. Any other questions?\nBye",          # end phrase before a trailing line: loose passes
]


def test_prompt_and_instruction_accuracy_strict_and_loose():
    res = score_responses(ITEMS, RESPONSES)
    m = res["metrics"]
    assert m["n_prompts"] == 3 and m["n_instructions"] == 5
    assert m["inst_strict"] == pytest.approx(2 / 5)
    assert m["inst_loose"] == pytest.approx(4 / 5)
    assert m["prompt_strict"] == pytest.approx(1 / 3)
    assert m["prompt_loose"] == pytest.approx(2 / 3)
    assert [r["strict"] for r in res["records"]] == [[True, True], [False], [False, False]]
    assert [r["loose"] for r in res["records"]] == [[True, True], [True], [True, False]]


def test_per_instruction_table_counts_each_type():
    rows = {r[0]: r[1:] for r in score_responses(ITEMS, RESPONSES)["tables"]["per instruction type"]["rows"]}
    assert rows["punctuation:no_comma"] == [2, 0.5, 1.0]
    assert rows["change_case:english_lowercase"] == [2, 0.5, 0.5]
    assert rows["startend:end_checker"] == [1, 0.0, 1.0]
    cats = {r[0]: r[1:] for r in score_responses(ITEMS, RESPONSES)["tables"]["per category"]["rows"]}
    assert cats["change_case"] == [2, 0.5, 0.5]


def test_empty_response_follows_nothing():
    assert score_responses(ITEMS[1:2], [""])["metrics"]["inst_loose"] == 0.0


def test_real_ifeval_file_loads_with_aligned_kwargs(shared_file):
    items = load_ifeval(shared_file("data/ifeval_input_data.jsonl"), limit=5)
    assert len(items) == 5 and items[0]["key"] == 1000
    res = score_responses(items, ["a plain answer without much in it."] * 5)
    assert 0 <= res["metrics"]["inst_loose"] <= 1


def test_misaligned_or_broken_lines_are_named(tmp_path):
    p = tmp_path / "if.jsonl"
    p.write_text(json.dumps({"prompt": "x", "instruction_id_list": ["a", "b"], "kwargs": [{}]}) + "\n")
    with pytest.raises(SFTError, match=r"if.jsonl:1: 2 instruction ids but 1 kwargs"):
        load_ifeval(p)
    p.write_text("{nope\n")
    with pytest.raises(SFTError, match=r"if.jsonl:1: not valid JSON"):
        load_ifeval(p)
    with pytest.raises(SFTError, match="3 responses for 1"):
        score_responses(ITEMS[:1], ["a", "b", "c"])
