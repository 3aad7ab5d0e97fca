"""Multiple-choice scoring: batched log-likelihoods equal a one-by-one computation, and
permuting the choices permutes the scores."""
import functools
import json

import pytest
import torch

from evaluation.mc import build_context, encode_pair, evaluate_mc, load_mc_items, score_continuations
from model import Tokenizer, load_pretrained
from model.errors import SFTError


@functools.lru_cache(maxsize=1)
def _load(folder):
    return load_pretrained(folder).eval(), Tokenizer.from_pretrained(folder)


@pytest.fixture
def pico(pico_dir):
    return _load(str(pico_dir))


def _items(shared_file, n=3):
    """n short validation questions (short keeps the one-by-one reference computation cheap)."""
    pool = load_mc_items(shared_file("data/mmlu_val.jsonl"), limit=40, seed=1)
    return sorted(pool, key=lambda it: len(it["question"]) + sum(map(len, it["choices"])))[:n]


def _direct_logprob(model, tok, ctx, cont):
    c, a = encode_pair(tok, ctx, cont)
    full = torch.tensor(c + a)
    with torch.no_grad():
        logp = torch.log_softmax(model(full[None, :-1])[0].float(), -1)  # (T-1, V)
    return sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(a))


def test_batched_scores_equal_direct_sum_of_token_logprobs(pico, shared_file):
    model, tok = pico
    pairs = []
    for style in ("letter", "text"):
        for item in _items(shared_file):
            ctx = build_context(item, [], style)
            answers = ["A", "B", "C", "D"] if style == "letter" else item["choices"]
            pairs += [(ctx, " " + a) for a in answers]
    batched = score_continuations(model, tok, pairs, batch_size=5)  # ragged batches, padding
    direct = [_direct_logprob(model, tok, c, a) for c, a in pairs]
    assert batched == pytest.approx(direct, abs=1e-3)
    assert all(s < 0 for s in batched)


def test_shuffling_choices_permutes_scores_and_keeps_accuracy(pico, shared_file, tmp_path):
    model, tok = pico
    items = _items(shared_file, 4)
    perm = [2, 0, 3, 1]
    shuffled = [dict(it, choices=[it["choices"][p] for p in perm],
                     answer_index=perm.index(it["answer_index"])) for it in items]
    for name, rows in (("a", items), ("b", shuffled)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ra = evaluate_mc(model, tok, tmp_path / "a.jsonl", style="text", batch_size=7)
    rb = evaluate_mc(model, tok, tmp_path / "b.jsonl", style="text", batch_size=3)
    for sa, sb in zip(ra["scores"], rb["scores"]):
        assert sb == pytest.approx([sa[p] for p in perm], abs=1e-4)
    assert ra["metrics"] == pytest.approx(rb["metrics"])


def test_k_shot_context_holds_solved_dev_examples_of_the_same_subject(shared_file):
    item = _items(shared_file, 1)[0]
    dev = [d for d in load_mc_items(shared_file("data/mmlu_dev.jsonl")) if d["subject"] == item["subject"]]
    ctx = build_context(item, dev[:2], "letter")
    assert ctx.startswith(f"The following are multiple choice questions (with answers) about "
                          f"{item['subject'].replace('_', ' ')}.\n\n")
    assert ctx.count("\nAnswer:") == 3 and ctx.endswith("\nAnswer:")
    assert f"Answer: {dev[0]['answer']}\n\n" in ctx


def test_continuation_tokens_come_from_encoding_the_whole_string(pico):
    _, tok = pico
    c, a = encode_pair(tok, "Question: the sky is\nAnswer:", " blue")
    assert c + a == tok.encode("Question: the sky is\nAnswer: blue", bos=True)
    c2, a2 = encode_pair(tok, "Answer: ", "blue")  # trailing space moves into the continuation
    assert c2 == tok.encode("Answer:", bos=True)
    assert c2 + a2 == tok.encode("Answer: blue", bos=True)


def test_bad_mc_file_names_the_line(tmp_path):
    p = tmp_path / "mc.jsonl"
    p.write_text('{"question": "q", "choices": ["a", "b"], "answer_index": 1}\n{"question": "q"}\n')
    with pytest.raises(SFTError, match=r"mc.jsonl:2: missing key"):
        load_mc_items(p)
    p.write_text('{"question": "q", "choices": ["a", "b"], "answer_index": 5}\n')
    with pytest.raises(SFTError, match=r"mc.jsonl:1: answer_index 5"):
        load_mc_items(p)
