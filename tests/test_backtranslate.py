"""Specs for the demo's back-translated instruction set and its held-out evaluation items."""
import json
import random

import torch

from data import demo_wordings as W
from data.backtranslate import (CONSTRAINT_IDS, apply_edit, build_demo_data, build_pairs, clean_text,
                                draw_kwargs, heldout_items, state, teacher_texts, write_jsonl)
from data.constraints import check_instruction
from evaluation.ifeval import load_ifeval

TEXTS = [
    {"topic": t, "text": f"Once upon a time there was {t}. She walked to the market with her brother, "
                         "and they sold apples. The king saw them and laughed. Then it began to rain. "
                         "They ran home, happy and wet."}
    for t in W.TRAIN_TOPICS[:6]
] + [
    {"topic": W.TRAIN_TOPICS[0], "text": "There was once a poor fisherman. He caught a golden fish one "
                                         "morning. The fish spoke to him kindly. He let it go."},
]


def test_every_constraint_type_yields_a_response_that_passes_its_checker():
    rng = random.Random(0)
    text, other = TEXTS[0]["text"], TEXTS[-1]["text"]
    for iid in CONSTRAINT_IDS:
        kwargs = draw_kwargs(iid, text, rng, "train")
        response = apply_edit(iid, kwargs, text, other, TEXTS[0]["topic"], rng)
        assert response is not None, iid
        assert check_instruction(iid, kwargs, response), (iid, kwargs, response)


def test_kept_pairs_pass_their_checkers_and_counts_add_up():
    pairs, counts = build_pairs(TEXTS, seed=0, per_text=5)
    assert pairs and sum(c["kept"] for c in counts.values()) == len(pairs)
    assert sum(c["kept"] + c["rejected"] for c in counts.values()) == 5 * len(TEXTS)
    for p in pairs:
        user, assistant = p["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert check_instruction(p["instruction_id"], p["kwargs"], assistant["content"])


def test_pairs_are_deterministic_for_a_seed_and_change_with_it():
    assert build_pairs(TEXTS, seed=3)[0] == build_pairs(TEXTS, seed=3)[0]
    assert build_pairs(TEXTS, seed=3)[0] != build_pairs(TEXTS, seed=4)[0]
    assert heldout_items(3, seed=1) == heldout_items(3, seed=1)


def test_heldout_halves_share_no_topic_task_wording_or_open_value():
    assert not set(W.TRAIN_TOPICS) & set(W.HELDOUT_TOPICS)
    assert not set(W.TRAIN_TASKS) & set(W.HELDOUT_TASKS)
    assert not set(W.TRAIN_END_PHRASES) & set(W.HELDOUT_END_PHRASES)
    assert not set(W.TRAIN_WORD_LIMITS) & set(W.HELDOUT_WORD_LIMITS)
    for iid, w in W.WORDINGS.items():
        assert w["train"] and w["heldout"], iid
        assert not set(w["train"]) & set(w["heldout"]), iid
        assert None not in w["heldout"], f"{iid}: IFEval's own wording is a training wording"


def test_heldout_prompts_contain_no_training_topic_task_or_wording():
    items = heldout_items(4, seed=0)
    train_text = [t.format(topic="") for t in W.TRAIN_TASKS] + W.TRAIN_TOPICS
    for it in items:
        (iid,), (kw,) = it["instruction_id_list"], it["kwargs"]
        assert not any(x in it["prompt"] for x in train_text), it["prompt"]
        for wording in W.WORDINGS[iid]["train"]:
            assert state(iid, kw, wording) not in it["prompt"], it["prompt"]
        if iid == "keywords:existence":
            assert set(kw["keywords"]) <= set(W.HELDOUT_KEYWORDS)


def test_training_keywords_are_read_off_the_text_and_never_heldout_ones():
    rng = random.Random(0)
    text = "The river ran past the old mill where the miller kept his lantern burning."
    for _ in range(20):
        kw = draw_kwargs("keywords:existence", text, rng, "train")
        assert all(k in text.lower() for k in kw["keywords"])
        assert not set(kw["keywords"]) & set(W.HELDOUT_KEYWORDS)


def test_heldout_items_load_as_ifeval_rows(tmp_path):
    items = heldout_items(2, seed=0)
    path = write_jsonl(tmp_path / "heldout.jsonl", items)
    assert load_ifeval(path) == items
    assert len(items) == 2 * len(CONSTRAINT_IDS)
    assert [p.name for p in tmp_path.iterdir()] == ["heldout.jsonl"]  # no temp file left behind


def test_clean_text_keeps_whole_sentences_only():
    assert clean_text("One two three four five six seven eight. Nine ten eleven twelve thirteen "
                      "fourteen fifteen. And then the") == ("One two three four five six seven eight. "
                                                            "Nine ten eleven twelve thirteen fourteen fifteen.")
    assert clean_text("Too short. Really.") is None


def test_teacher_texts_are_deterministic_and_start_with_an_opener(pico_dir):
    from model import Tokenizer, load_pretrained
    torch.manual_seed(0)
    model, tok = load_pretrained(str(pico_dir)).eval(), Tokenizer.from_pretrained(str(pico_dir))
    with torch.no_grad():
        a = teacher_texts(model, tok, W.TRAIN_TOPICS[:4], 2, seed=5, max_new_tokens=40)
        b = teacher_texts(model, tok, W.TRAIN_TOPICS[:4], 2, seed=5, max_new_tokens=40)
    assert a == b and a
    openers = [o.format(topic=t["topic"]) for t in a for o in W.OPENERS]
    assert all(any(t["text"].startswith(o) for o in openers) for t in a)


def test_build_demo_data_writes_training_mix_and_heldout_files(pico_dir, tmp_path):
    from model import Tokenizer
    mix = write_jsonl(tmp_path / "mix.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi."}])
    train, held = build_demo_data(str(pico_dir), Tokenizer.from_pretrained(str(pico_dir)), tmp_path / "run",
                                  mix=str(mix), per_topic=1, per_text=2, heldout_per_type=1, log=lambda *a: None)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]} in rows
    assert sum("instruction_id" in r for r in rows) >= 20
    assert len(load_ifeval(held)) == len(CONSTRAINT_IDS)
