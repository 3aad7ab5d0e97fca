"""Multiple choice by log-likelihood: does fine-tuning keep what the base model knew?

Nothing is generated. For a question with context c and choices a_1..a_n, the model scores each
continuation by the sum of its token log-probabilities,

    score_i = sum_t log p(a_i[t] | c, a_i[<t])

and picks argmax_i score_i (`acc`). Long answers collect more negative terms, so `acc_norm`
divides by the answer's length in characters first, argmax_i score_i / len(a_i), exactly as
lm-eval's `acc_norm` does (characters, not tokens, so that tokenizers stay comparable).

Two prompt styles, both as in lm-eval:
- "letter" (MMLU's usual form): the question, the lettered options, "Answer:", and the
  continuations " A" .. " D". The answer strings are one letter each, so acc_norm == acc.
- "text" (lm-eval's mmlu_continuation): "Question: ...\\nAnswer:" and the continuations are the
  answer texts themselves; here the length normalisation matters.
k-shot prepends the first k dev examples of the same subject, each with its answer filled in.
A context longer than the model's positions keeps its END (the question being asked and the
answer slot); the description and the first shots are what falls off.

Tokenization pitfall: encoding context and continuation separately can give different tokens
at the seam than encoding the whole string (a SentencePiece word piece absorbs the leading
space). Like lm-eval's `_encode_pair`, we encode `context + continuation` once and call the
tokens after `len(encode(context))` the continuation; a trailing space of the context is moved
into the continuation first.

Batching: pairs whose model input is identical share one row (with one-token answers like
" A".." D", the four choices of a question differ only in the target, so this is 4x less work);
rows are sorted by length and run right-padded. Right padding is harmless under a causal mask
(real tokens never attend to later pads). Only the
hidden states at continuation positions go through `lm_head`, so a 32k-vocabulary model never
materialises (B, T, V) logits: we gather (N_cont_tokens, D) rows, then (N_cont_tokens, V).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from model.errors import SFTError
from model.files import iter_jsonl

LETTERS = "ABCDEFGHIJ"
REQUIRED_KEYS = ("question", "choices", "answer_index")


def load_mc_items(path: str | Path, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Read MC items (JSONL: question, choices, answer_index, optional subject).

    With `limit`, a seeded random subset in file order: MMLU files are sorted by subject, so the
    first N items would all be abstract algebra.
    """
    path = Path(path)
    if not path.is_file():
        raise SFTError(f"{path}: multiple-choice file not found (expected JSONL like mmlu_test.jsonl)")
    items = []
    for lineno, item in iter_jsonl(path, "multiple-choice file"):
        missing = [k for k in REQUIRED_KEYS if k not in item]
        if missing:
            raise SFTError(f"{path}:{lineno}: missing key(s) {missing}; each line needs "
                           f"{list(REQUIRED_KEYS)}")
        if not isinstance(item["answer_index"], int) or not 0 <= item["answer_index"] < len(item["choices"]):
            raise SFTError(f"{path}:{lineno}: answer_index {item['answer_index']} is outside "
                           f"the {len(item['choices'])} choices")
        items.append(item)
    if limit is not None and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items


def _question_block(item: dict, style: str) -> str:
    if style == "letter":
        opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"]))
        return f"{item['question'].strip()}{opts}\nAnswer:"
    return f"Question: {item['question'].strip()}\nAnswer:"


def _answers(item: dict, style: str) -> list[str]:
    """The continuation strings (without the leading space delimiter)."""
    if style == "letter":
        return [LETTERS[i] for i in range(len(item["choices"]))]
    return [str(c) for c in item["choices"]]


def build_context(item: dict, shots: list[dict], style: str) -> str:
    """Description line + k solved examples + the question, in lm-eval's MMLU layout."""
    subject = item.get("subject", "")
    kind = "multiple choice questions" if style == "letter" else "questions"
    desc = f"The following are {kind} (with answers) about {subject.replace('_', ' ')}.\n\n" if subject else ""
    solved = [_question_block(s, style) + " " + _answers(s, style)[int(s["answer_index"])] for s in shots]
    return desc + "".join(x + "\n\n" for x in solved) + _question_block(item, style)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids) split from one encoding of the whole string."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer.encode(context + continuation, bos=True)
    ctx = tokenizer.encode(context, bos=True)
    cont = whole[len(ctx):]
    if not cont:
        raise SFTError(f"continuation {continuation!r} encodes to no tokens after its context")
    return whole[:len(ctx)], cont


@torch.no_grad()
def score_continuations(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                        max_len: int | None = None) -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation) pair."""
    max_len = max_len or model.config.max_position_embeddings
    device = next(model.parameters()).device
    # One row per distinct model input. With one-token continuations (" A".." D") all choices of
    # a question share the input (the context) and differ only in the target: 4x fewer rows.
    rows: dict[tuple, list[tuple[int, list[int]]]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        c, a = encode_pair(tokenizer, ctx, cont)
        seq = (c + a)[-(max_len + 1):]  # input seq[:-1] fits the model; targets are seq[1:]
        rows.setdefault(tuple(seq[:-1]), []).append((i, a))
    inputs = sorted(rows, key=len, reverse=True)  # similar lengths per batch: little padding
    scores = [0.0] * len(pairs)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        inp = torch.zeros(len(chunk), len(chunk[0]), dtype=torch.long)  # right padding
        r_idx, c_idx, targets, owner = [], [], [], []
        for r, key in enumerate(chunk):
            inp[r, :len(key)] = torch.tensor(key)
            for i, cont in rows[key]:
                # hidden at position t predicts token t+1: the last len(cont) inputs predict cont.
                r_idx += [r] * len(cont)
                c_idx += range(len(key) - len(cont), len(key))
                targets += cont
                owner += [i] * len(cont)
        hidden = model(inp.to(device), return_hidden=True)                     # (B, T, D)
        dev = hidden.device
        picked = hidden[torch.tensor(r_idx, device=dev), torch.tensor(c_idx, device=dev)]  # (N, D)
        logp = torch.log_softmax(model.lm_head(picked).float(), dim=-1)         # (N, V)
        tok_lp = logp[torch.arange(len(targets), device=dev), torch.tensor(targets, device=dev)]
        for i, lp in zip(owner, tok_lp.tolist()):
            scores[i] += lp
    return scores


def evaluate_mc(model, tokenizer, path: str | Path, dev_path: str | Path | None = None, k_shot: int = 0,
                limit: int | None = None, style: str = "letter", batch_size: int = 16, seed: int = 0) -> dict:
    """acc / acc_norm over an MC file, with a per-subject table."""
    if style not in ("letter", "text"):
        raise SFTError(f"--mc-style {style!r}: choose 'letter' or 'text'")
    items = load_mc_items(path, limit=limit, seed=seed)
    shots_by_subject: dict[str, list[dict]] = {}
    if k_shot > 0:
        if dev_path is None:
            raise SFTError("--k-shot > 0 needs a dev file with solved examples (--mc-dev)")
        for d in load_mc_items(dev_path):
            shots_by_subject.setdefault(d.get("subject", ""), []).append(d)
    pairs, owners = [], []
    for n, item in enumerate(items):
        ctx = build_context(item, shots_by_subject.get(item.get("subject", ""), [])[:k_shot], style)
        for ans in _answers(item, style):
            pairs.append((ctx, " " + ans))
            owners.append(n)
    scores = score_continuations(model, tokenizer, pairs, batch_size=batch_size)
    per_item: list[list[float]] = [[] for _ in items]
    for n, s in zip(owners, scores):
        per_item[n].append(s)
    correct, correct_norm, by_subject = 0, 0, {}
    for item, sc in zip(items, per_item):
        lens = [len(a) for a in _answers(item, style)]
        gold = int(item["answer_index"])
        hit = max(range(len(sc)), key=lambda i: sc[i]) == gold
        hit_norm = max(range(len(sc)), key=lambda i: sc[i] / lens[i]) == gold
        correct += hit
        correct_norm += hit_norm
        s = by_subject.setdefault(item.get("subject", "-"), [0, 0, 0])
        s[0] += 1
        s[1] += hit
        s[2] += hit_norm
    n = max(1, len(items))
    rows = [[subj, c, a / c, b / c] for subj, (c, a, b) in sorted(by_subject.items())]
    return {
        "metrics": {"acc": correct / n, "acc_norm": correct_norm / n, "n_items": len(items)},
        "config": {"data": str(path), "k_shot": k_shot, "style": style, "limit": limit, "seed": seed},
        "tables": {"per subject": {"header": ["subject", "n", "acc", "acc_norm"], "rows": rows}},
        "scores": per_item,
    }
