"""Data-quality filters (dedup, length, perplexity, judge): records in, (kept, rejected-with-reason) out.

The library half of `python -m data.filter` (data/filter.py, the command that runs these in
sequence from a config). LIMA and AlpaGasus showed that a few thousand good examples beat many
mediocre ones; these filters are how one gets there without losing anything: every dropped
record is written to a rejects file with the reason, so a threshold can be judged by reading
what it removed.

A *record* is whatever the input file holds (Alpaca `instruction/input/output`, ShareGPT
`conversations`, OpenAI `messages`); `prompt_and_response` reads the text a filter looks at
and the record itself is written back unchanged.

Each filter's options are one dataclass (the `[[filters]]` table of that `type` in a config,
checked by model/options.py); a function takes the records and those options:

* `exact_dedup`, `near_dedup` (NearDedup): see data/dedup.py (normalised hash; MinHash + LSH).
* `length_filter` (LengthFilter): characters or tokens of prompt and response, and the
  response/prompt ratio (a one-word answer to a long request is rarely a good example).
* `perplexity_filter` (PerplexityFilter): the response's perplexity under a model,
  exp(CE summed over the response tokens / their count), with the prompt as context. Very low
  perplexity flags boilerplate and repetition, very high flags noise; we drop chosen quantiles
  of both tails. The CE comes from model/loss.py `masked_ce_sum`, one row at a time on a
  batched forward.
* `judge_filter` (JudgeFilter): a teacher (data/teacher.py) rates each example 1-5 with a
  reason; `parse_score` finds the score in free text ("Score: 4", "4/5", "**Rating**: 4 - good").
  An answer with no score is counted as malformed and the record is rejected, not the run.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from data import formats
from data.dedup import exact_duplicates, near_duplicates
from data.teacher import TemplateChoice
from model.errors import SFTError
from model.files import atomic_write
from model.loss import IGNORE_INDEX
from model.options import opt

Rejects = list[tuple[dict, str]]
Keep = Literal["first", "longest"]


def prompt_and_response(record: dict) -> tuple[str, str]:
    """(prompt text, response text) of an Alpaca, ShareGPT or OpenAI-messages record."""
    if "instruction" in record:
        prompt = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
        return prompt, record.get("output", "")
    turns = record.get("messages") or record.get("conversations")
    if not isinstance(turns, list):
        raise SFTError(f"record has none of instruction/messages/conversations: keys {sorted(record)}")
    role = lambda t: t.get("role") or {"human": "user", "gpt": "assistant"}.get(t.get("from"), t.get("from"))  # noqa: E731
    text = lambda t: t.get("content") or t.get("value") or ""  # noqa: E731
    prompt = "\n".join(text(t) for t in turns if role(t) != "assistant")
    return prompt, "\n".join(text(t) for t in turns if role(t) == "assistant")


def record_messages(record: dict) -> list[dict]:
    """The record as a chat: [{"role": "user", ...}, {"role": "assistant", ...}]."""
    prompt, response = prompt_and_response(record)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# ------------------------------------------------------------------------------ dedup

@dataclass
class ExactDedup:
    """Drop a record whose normalised prompt and response an earlier record has (no options)."""


@dataclass
class NearDedup:
    threshold: float = opt(0.7, "estimated Jaccard similarity of word shingles that makes a duplicate",
                           gt=0, le=1)
    num_perm: int = opt(128, "MinHash permutations (signature length)", ge=1)
    ngram: int = opt(3, "words per shingle", ge=1)
    keep: Keep = opt("first", "which record of a cluster stays: the first, or the longest response")


def exact_dedup(records: list[dict], opts: ExactDedup | None = None) -> tuple[list[dict], Rejects]:
    dup = exact_duplicates(["\n".join(prompt_and_response(r)) for r in records])
    kept = [r for r, d in zip(records, dup) if d is None]
    return kept, [(r, f"exact duplicate of record {d}") for r, d in zip(records, dup) if d is not None]


def near_dedup(records: list[dict], opts: NearDedup | None = None) -> tuple[list[dict], Rejects]:
    o = opts or NearDedup()
    texts = ["\n".join(prompt_and_response(r)) for r in records]
    scores = [len(prompt_and_response(r)[1]) for r in records] if o.keep == "longest" else None
    res = near_duplicates(texts, o.threshold, o.num_perm, o.ngram, scores=scores)
    kept = [r for r, d in zip(records, res) if d is None]
    rejects = [(r, f"near duplicate of record {d[0]} (estimated Jaccard {d[1]:.2f})")
               for r, d in zip(records, res) if d is not None]
    return kept, rejects


# ----------------------------------------------------------------------------- length

@dataclass
class LengthFilter:
    min_prompt_chars: int = opt(0, "prompt characters at least", ge=0)
    max_prompt_chars: int = opt(0, "prompt characters at most (0: no limit)", ge=0)
    min_response_chars: int = opt(1, "response characters at least", ge=0)
    max_response_chars: int = opt(0, "response characters at most (0: no limit)", ge=0)
    min_ratio: float = opt(0.0, "response/prompt characters at least", ge=0)
    max_ratio: float = opt(0.0, "response/prompt characters at most (0: no limit)", ge=0)
    max_total_tokens: int = opt(0, "prompt + response tokens at most (0: no limit; needs model_dir)", ge=0)
    model_dir: str = opt("", "model folder whose tokenizer counts the tokens of max_total_tokens")


def length_filter(records: list[dict], opts: LengthFilter | None = None,
                  tokenizer=None) -> tuple[list[dict], Rejects]:
    """Bounds on characters, total tokens (needs `tokenizer`) and response/prompt char ratio."""
    o = opts or LengthFilter()
    if o.max_total_tokens and tokenizer is None:
        raise SFTError("length filter: max_total_tokens needs a tokenizer (model_dir in a config)")
    kept, rejects = [], []
    for r in tqdm(records, desc="length", unit="record", leave=False, disable=None):
        p, a = prompt_and_response(r)
        ratio = len(a) / max(len(p), 1)
        reason = None
        if not o.min_prompt_chars <= len(p) <= (o.max_prompt_chars or math.inf):
            reason = f"prompt has {len(p)} chars, outside [{o.min_prompt_chars}, {o.max_prompt_chars or 'inf'}]"
        elif not o.min_response_chars <= len(a) <= (o.max_response_chars or math.inf):
            reason = f"response has {len(a)} chars, outside [{o.min_response_chars}, {o.max_response_chars or 'inf'}]"
        elif not o.min_ratio <= ratio <= (o.max_ratio or math.inf):
            reason = f"response/prompt ratio {ratio:.2f} outside [{o.min_ratio}, {o.max_ratio or 'inf'}]"
        elif o.max_total_tokens:
            n = len(tokenizer.encode(p + "\n" + a))
            if n > o.max_total_tokens:
                reason = f"{n} tokens > max_total_tokens {o.max_total_tokens}"
        if reason:
            rejects.append((r, reason))
        else:
            kept.append(r)
    return kept, rejects


# ------------------------------------------------------------------------- perplexity

def response_perplexities(records: list[dict], model, tokenizer, template: str = "alpaca",
                          batch_size: int = 8, max_len: int | None = None) -> list[float]:
    """Perplexity of each record's response given its prompt (nan when nothing is scorable)."""
    import torch

    from data.masking import tokenize_conversation
    from model.loss import masked_ce_sum
    max_len = max_len or model.config.max_position_embeddings
    samples = [_tokenize_or_none(tokenize_conversation, tokenizer, template, r, max_len) for r in records]
    # batch samples of similar length together so little compute goes to padding
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]) if samples[i] else 0)
    out: list[float] = [math.nan] * len(samples)
    for s in tqdm(range(0, len(order), batch_size), desc="perplexity", unit="batch", leave=False, disable=None):
        chunk = [samples[i] for i in order[s : s + batch_size]]
        width = max(len(x["input_ids"]) if x else 1 for x in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)            # (B, T), right-padded
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)  # pad positions ignored
        for i, x in enumerate(chunk):
            if x:
                ids[i, : len(x["input_ids"])] = torch.tensor(x["input_ids"])
                labels[i, : len(x["labels"])] = torch.tensor(x["labels"])
        device = model.embed_tokens.weight.device
        ids, labels = ids.to(device), labels.to(device)
        with torch.no_grad():
            hidden = model(ids, return_hidden=True)                       # (B, T, D)
            for i, idx in enumerate(order[s : s + batch_size]):
                total, n = masked_ce_sum(model, hidden[i : i + 1], labels[i : i + 1])
                out[idx] = math.exp(total.item() / n) if n else math.nan
    return out


def _tokenize_or_none(tokenize_conversation, tokenizer, template, record, max_len):
    try:
        return tokenize_conversation(tokenizer, template, record_messages(record), max_len=max_len)
    except SFTError:  # e.g. an empty message: scored as nan, rejected with a reason
        return None


@dataclass
class PerplexityFilter:
    model_dir: str = opt("", "model folder that scores the responses (required)")
    template: TemplateChoice = opt("auto", "chat template the prompt is written in (auto: the model's own, "
                                   "else alpaca)")
    drop_low: float = opt(0.0, "share of the lowest perplexities dropped (boilerplate, repetition)", ge=0, lt=1)
    drop_high: float = opt(0.1, "share of the highest perplexities dropped (noise)", ge=0, lt=1)
    batch_size: int = opt(8, "records per forward pass", ge=1)
    max_len: int = opt(0, "tokens per record (0: the model's context length)", ge=0)


def perplexity_filter(records: list[dict], model, tokenizer,
                      opts: PerplexityFilter | None = None) -> tuple[list[dict], Rejects]:
    """Drop the `drop_low` lowest and `drop_high` highest quantiles of response perplexity."""
    import numpy as np

    from data.chat import resolve_template
    o = opts or PerplexityFilter()
    template, note = resolve_template(o.model_dir or "the model", tokenizer, o.template,
                                      option="the perplexity filter's template")
    if note:
        tqdm.write(f"note: {note}")
    drop_low, drop_high = o.drop_low, o.drop_high
    ppl = response_perplexities(records, model, tokenizer, template, o.batch_size, o.max_len or None)
    finite = np.array([p for p in ppl if not math.isnan(p)])
    lo = float(np.quantile(finite, drop_low)) if finite.size and drop_low > 0 else -math.inf
    hi = float(np.quantile(finite, 1 - drop_high)) if finite.size and drop_high > 0 else math.inf
    kept, rejects = [], []
    for r, p in zip(records, ppl):
        if math.isnan(p):
            rejects.append((r, "no response tokens to score (empty or truncated)"))
        elif p < lo:
            rejects.append((r, f"perplexity {p:.2f} below the {drop_low:.0%} quantile {lo:.2f}"))
        elif p > hi:
            rejects.append((r, f"perplexity {p:.2f} above the {1 - drop_high:.0%} quantile {hi:.2f}"))
        else:
            kept.append(r)
    return kept, rejects


# ------------------------------------------------------------------------------ judge

JUDGE_PROMPT = (
    "Rate the quality of the assistant's response to the instruction on a scale of 1 to 5 "
    "(1 = useless or wrong, 3 = acceptable, 5 = excellent: correct, helpful, well written).\n\n"
    "Instruction:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Answer in the form:\nScore: <1-5>\nReason: <one short sentence>"
)
_SCORE_PATTERNS = [
    r"(?:score|rating|grade)\W{0,4}(?:is\W{0,3})?([1-5](?:\.\d+)?)(?!\d)",
    r"(?<![\d.])([1-5](?:\.\d+)?)\s*(?:/|out of)\s*5\b",
    r"^\W*([1-5])(?:\.\d+)?\W*$",
]


def parse_score(text: str) -> tuple[float | None, str]:
    """(score in [1, 5] or None, reason) from a judge's free-text answer."""
    score = None
    for pattern in _SCORE_PATTERNS:
        m = re.search(pattern, text, flags=re.IGNORECASE | re.MULTILINE)
        if m:
            score = float(m.group(1))
            break
    reason = re.search(r"reason\W{0,3}(.*)", text, flags=re.IGNORECASE)
    return score, (reason.group(1).strip() if reason else text.strip()[:200])


@dataclass
class JudgeFilter:
    min_score: float = opt(3.0, "keep records the judge scores at least this", ge=1, le=5)
    max_tokens: int = opt(96, "tokens per judge answer", ge=1)
    batch_size: int = opt(8, "records per judge request batch", ge=1)


def judge_records(records: list[dict], teacher, max_tokens: int = 96, batch_size: int = 8) -> list[tuple[float | None, str]]:
    """The judge's (score, reason) for each record."""
    out = []
    with tqdm(total=len(records), desc="judge", unit="record", leave=False, disable=None) as bar:
        for s in range(0, len(records), batch_size):
            chats = []
            for r in records[s : s + batch_size]:
                p, a = prompt_and_response(r)
                chats.append([{"role": "user", "content": JUDGE_PROMPT.format(prompt=p, response=a)}])
            out += [parse_score(t) for t in teacher.complete_many(chats, max_tokens=max_tokens, temperature=0.0)]
            bar.update(len(chats))
    return out


def judge_filter(records: list[dict], teacher, opts: JudgeFilter | None = None) -> tuple[list[dict], Rejects]:
    """Keep records the judge scores >= min_score; unparseable answers are rejected as malformed."""
    o = opts or JudgeFilter()
    kept, rejects = [], []
    for r, (score, reason) in zip(records, judge_records(records, teacher, o.max_tokens, o.batch_size)):
        if score is None:
            rejects.append((r, f"judge answer malformed (no 1-5 score): {reason[:120]!r}"))
        elif score < o.min_score:
            rejects.append((r, f"judge score {score:g} < {o.min_score:g}: {reason[:160]}"))
        else:
            kept.append(r)
    return kept, rejects


# ------------------------------------------------------------------------------- I/O

def read_records(path: str | Path) -> list[dict]:
    """Records of a JSON array or JSONL file, unchanged (read and checked by data.formats)."""
    return [record for _, record in formats.read_records(path)]


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSONL through a temp file in the same folder, then rename (never half a file)."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_filter_output(folder: str | Path, name: str, kept: list[dict], rejects: Rejects) -> None:
    """`{name}.kept.jsonl` and `{name}.rejects.jsonl` ({"reason", "record"} per line)."""
    folder = Path(folder)
    write_jsonl_atomic(folder / f"{name}.kept.jsonl", kept)
    write_jsonl_atomic(folder / f"{name}.rejects.jsonl", [{"reason": why, "record": r} for r, why in rejects])


# the `type` of each [[filters]] table in a data.filter config -> its options
FILTERS = {"exact_dedup": ExactDedup, "near_dedup": NearDedup, "length": LengthFilter,
           "perplexity": PerplexityFilter, "judge": JudgeFilter}
