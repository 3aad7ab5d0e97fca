"""Pairwise judging: which of two answers to the same question is better, asked in both orders.

Two contestants answer the same questions (MT-Bench style: one or two user turns each): our
model M, and either a second model or a fixed set of reference answers O. A judge (any object
with `complete(messages, max_tokens, temperature) -> str`, i.e. `data.teacher.Teacher`: a local
model folder or an OpenAI-compatible endpoint) reads the question and both answers and ends
with "[[A]]", "[[B]]" or "[[C]]" (tie), as in MT-Bench's pairwise prompt.

LLM judges prefer whichever answer they see first (position bias), so every question is judged
twice, with M as assistant A and then as assistant B:

    game 1 (A=M, B=O) -> m1 in {win, tie, loss}     game 2 (A=O, B=M) -> m2
    final = m1 if m1 == m2 else tie                  flip = (m1 != m2)

All 2n judge chats go out in one `complete_many` call when the judge has it (a local judge
then generates them in batches; an endpoint answers them one by one, cached on disk).

`flip_rate` is how often the verdict depends only on the order; a judge with a high flip rate
is measuring position, not quality. An unparseable verdict counts as a tie for that game and is
reported in `n_unparsed`. `score` = (wins + ties / 2) / n, the usual single number.

Verdict parsing is deliberately forgiving: the last "[[X]]" wins (the judge may quote the
format earlier in its explanation), then phrases like "Final verdict: A" or "Assistant B is
better", then "tie".
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from model.errors import SFTError
from model.files import iter_jsonl

SYSTEM_PAIR = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. You should choose the assistant that follows "
    "the user's instructions and answers the user's question better. Your evaluation should consider "
    "factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of "
    "their responses. Begin your evaluation by comparing the two responses and provide a short "
    "explanation. Avoid any position biases and ensure that the order in which the responses were "
    "presented does not influence your decision. Do not allow the length of the responses to influence "
    "your evaluation. Do not favor certain names of the assistants. Be as objective as possible. After "
    "providing your explanation, output your final verdict by strictly following this format: \"[[A]]\" "
    "if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.")
MULTI_TURN_NOTE = " You should focus on who provides a better answer to the last user question."

_BRACKET = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_PHRASES = [
    # Only the words are case-insensitive: in "verdict is a tie" the article "a" is not assistant A.
    (re.compile(r"(?i:(?:final\s+)?verdict\s*(?:is)?\s*[:\-]?\s*\[?\s*(?:assistant\s+)?)([ABC])\b"), None),
    (re.compile(r"(?i:\bassistant\s+)([AB])(?i:\s+(?:is|was|provides?|gives?)\s+(?:the\s+)?"
                r"(?:clearly\s+|slightly\s+)?(?:better|superior|more\s+helpful|the\s+winner))"), None),
    (re.compile(r"\b(?:it'?s\s+a\s+tie|tie\b|equally\s+good|both\s+(?:are\s+)?equally)", re.I), "tie"),
]
_NORMAL = {"A": "A", "B": "B", "C": "tie", "TIE": "tie"}


def parse_verdict(text: str) -> str | None:
    """'A', 'B', 'tie' or None from a judge's free-text reply."""
    hits = _BRACKET.findall(text or "")
    if hits:
        return _NORMAL[hits[-1].upper()]
    for pattern, fixed in _PHRASES:
        found = pattern.findall(text or "")
        if found:
            return fixed or _NORMAL[found[-1].upper()]
    return None


def judge_messages(turns: list[str], answers_a: list[str], answers_b: list[str]) -> list[dict]:
    """The chat sent to the judge: system rules + the question(s) and both answers."""
    if len(turns) == 1:
        user = (f"[User Question]\n{turns[0]}\n\n"
                f"[The Start of Assistant A's Answer]\n{answers_a[0]}\n[The End of Assistant A's Answer]\n\n"
                f"[The Start of Assistant B's Answer]\n{answers_b[0]}\n[The End of Assistant B's Answer]")
        return [{"role": "system", "content": SYSTEM_PAIR}, {"role": "user", "content": user}]
    blocks = []
    for name, answers in (("A", answers_a), ("B", answers_b)):
        conv = "".join(f"### User:\n{q}\n\n### Assistant {name}:\n{a}\n\n" for q, a in zip(turns, answers))
        blocks.append(f"<|The Start of Assistant {name}'s Conversation with User|>\n\n{conv}"
                      f"<|The End of Assistant {name}'s Conversation with User|>")
    return [{"role": "system", "content": SYSTEM_PAIR + MULTI_TURN_NOTE},
            {"role": "user", "content": "\n\n\n".join(blocks)}]


def combine(v1: str | None, v2: str | None) -> tuple[str, bool]:
    """Game 1 has M as A, game 2 has M as B -> (M's outcome, did the verdict flip with order)."""
    m1 = {"A": "win", "B": "loss"}.get(v1, "tie")
    m2 = {"A": "loss", "B": "win"}.get(v2, "tie")
    return (m1 if m1 == m2 else "tie"), m1 != m2


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """[{id, category, turns}] from MT-Bench JSONL (turns) or any JSONL with prompt/instruction."""
    path = Path(path)
    if not path.is_file():
        raise SFTError(f"{path}: judge question file not found (e.g. mt_bench_question.jsonl)")
    out = []
    for lineno, rec in iter_jsonl(path):
        turns = rec.get("turns") or [rec.get("prompt") or rec.get("instruction")]
        if not all(isinstance(t, str) and t for t in turns):
            raise SFTError(f"{path}:{lineno}: needs 'turns' (list of str) or 'prompt'/'instruction'")
        out.append({"id": rec.get("question_id", rec.get("key", lineno)),
                    "category": rec.get("category", ""), "turns": turns})
    return out[:limit] if limit else out


def load_reference_answers(path: str | Path) -> dict:
    """{question_id: [answer per turn]} from FastChat answer JSONL (choices[0].turns) or
    simple JSONL with question_id and 'turns' (list) or 'answer' (str)."""
    path = Path(path)
    if not path.is_file():
        raise SFTError(f"{path}: reference answer file not found")
    out = {}
    for lineno, rec in iter_jsonl(path):
        if "question_id" not in rec:
            raise SFTError(f"{path}:{lineno}: missing 'question_id'")
        turns = (rec["choices"][0]["turns"] if rec.get("choices") else
                 rec.get("turns") or ([rec["answer"]] if "answer" in rec else None))
        if not turns:
            raise SFTError(f"{path}:{lineno}: needs choices[0].turns, 'turns' or 'answer'")
        out[rec["question_id"]] = turns
    return out


def answer_questions(generate: Callable[[list[list[dict]]], list[str]], questions: list[dict],
                     n_turns: int) -> list[list[str]]:
    """Answer every question turn by turn; turn k sees the model's own earlier answers."""
    convs = [[] for _ in questions]
    answers = [[] for _ in questions]
    for k in range(n_turns):
        for conv, q in zip(convs, questions):
            conv.append({"role": "user", "content": q["turns"][k]})
        replies = generate(convs)
        for conv, ans, r in zip(convs, answers, replies):
            conv.append({"role": "assistant", "content": r})
            ans.append(r)
    return answers


def run_judge(judge, questions: list[dict], answers_m: list[list[str]], answers_o: list[list[str]],
              n_turns: int = 1, max_tokens: int = 512) -> dict:
    """Judge every question in both orders; win/tie/loss for M, flip rate, per-question records."""
    chats = []
    for q, am, ao in zip(questions, answers_m, answers_o):
        turns = q["turns"][:n_turns]
        chats += [judge_messages(turns, am, ao), judge_messages(turns, ao, am)]  # M first, then M second
    if hasattr(judge, "complete_many"):  # a local judge answers them in batches
        replies = judge.complete_many(chats, max_tokens=max_tokens, temperature=0.0)
    else:
        replies = [judge.complete(c, max_tokens=max_tokens, temperature=0.0) for c in chats]
    records, counts, flips, unparsed, first_pos_wins = [], {"win": 0, "tie": 0, "loss": 0}, 0, 0, 0
    for k, (q, am, ao) in enumerate(zip(questions, answers_m, answers_o)):
        r1, r2 = replies[2 * k], replies[2 * k + 1]
        v1, v2 = parse_verdict(r1), parse_verdict(r2)
        outcome, flipped = combine(v1, v2)
        counts[outcome] += 1
        flips += flipped
        unparsed += (v1 is None) + (v2 is None)
        first_pos_wins += (v1 == "A") + (v2 == "A")
        records.append({"id": q["id"], "category": q["category"], "verdicts": [v1, v2],
                        "outcome": outcome, "flipped": flipped, "answer_model": am, "answer_other": ao,
                        "judge_raw": [r1, r2]})
    n = max(1, len(records))
    by_cat = {}
    for r in records:
        c = by_cat.setdefault(r["category"] or "-", {"win": 0, "tie": 0, "loss": 0})
        c[r["outcome"]] += 1
    return {
        "metrics": {"win_rate": counts["win"] / n, "tie_rate": counts["tie"] / n,
                    "loss_rate": counts["loss"] / n, "score": (counts["win"] + counts["tie"] / 2) / n,
                    "flip_rate": flips / n, "first_position_win_rate": first_pos_wins / (2 * n),
                    "n_prompts": len(records), "n_unparsed": unparsed},
        "tables": {"per category": {"header": ["category", "win", "tie", "loss"],
                                    "rows": [[k, v["win"], v["tie"], v["loss"]] for k, v in sorted(by_cat.items())]}},
        "records": records,
    }
