"""Tool-call evaluation: does the model call the right function with the right arguments, and only then?

Every assistant turn of a held-out conversation is one test. The prompt is the conversation so
far (tools, system, user turns, earlier calls and their results); the reference is the turn
itself, which either calls tools or answers in text:

    prompt    = conversation[:i]            (a Conversation: slicing keeps .tools)
    reference = conversation[i]             (assistant: "tool_calls" or text)
    reply     = generate([prompt])[0]  ->  parse(reply)  ->  ParsedCalls(calls, attempted, parseable, problem)

The call is compared as a *structure*, not as text, as the Berkeley Function-Calling Leaderboard
(BFCL) does with its AST match: `{"city": "Paris", "days": 3}` and `{"days": 3.0, "city": "Paris"}`
are the same call, `{"days": "3"}` is not. Equality is JSON-value equality: objects ignore key
order, arrays keep theirs, numbers compare by value (1 == 1.0), and true is not 1. Several calls in
one turn (parallel calls) match when each reference call pairs with a distinct generated call, in
any order, and no call is left over. BFCL's checker is more forgiving where its references list
several acceptable values per parameter, may omit optional parameters, and normalise strings
(case, spaces, punctuation); ours has exactly one reference per turn, so it asks for that exact
value. The figure is therefore a lower bound of BFCL's on the same outputs.

Each reply gets one verdict:

    reference calls tools:   right call | wrong arguments | wrong function | unparseable | no call
    reference is text:       text | call instead of text

and the four rates are sums of verdicts, each over all turns of its kind (not over those that
passed the step before), so base and tuned models are compared on the same denominators:

    call_parse_rate    (right call + wrong arguments + wrong function) / call turns
    call_name_acc      (right call + wrong arguments)                  / call turns
    call_args_acc       right call                                     / call turns
    text_no_call_rate   text                                           / text turns

The counts behind them are the `n_*` metrics (`n_call_turns` and `n_text_turns` are what
`eval.py compare` uses to tell a real change from noise). Tables: verdict counts, and per
reference function how often it was called by name and with exact arguments.

This module runs no model: `generate` and `parse` are passed in (eval.py gives the project's
batched generation and the template's own tool-call parser), so it is tested with a scripted fake.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Literal

from data.conversation import Conversation
from data.tool_templates import ParsedCalls  # what parse(reply) returns: calls, attempted, parseable, problem
from model.errors import SFTError

Verdict = Literal["right call", "wrong arguments", "wrong function", "unparseable", "no call",
                  "text", "call instead of text"]
CALL_VERDICTS: tuple[Verdict, ...] = ("right call", "wrong arguments", "wrong function", "unparseable", "no call")
TEXT_VERDICTS: tuple[Verdict, ...] = ("text", "call instead of text")


def json_equal(a, b) -> bool:
    """Equal as JSON values: key order ignored, 1 == 1.0, true != 1, arrays in order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def pair_calls(reference: list[dict], generated: list[dict]) -> list[tuple[str, bool, bool]]:
    """(name, called by name, called with equal arguments) for each reference call.

    Exact matches are paired first, then same-name ones, each generated call used once. Greedy
    pairing is optimal here because "same call" is an equivalence relation.
    """
    free = list(range(len(generated)))
    exact, named = {}, {}
    for i, ref in enumerate(reference):
        j = next((j for j in free if generated[j]["name"] == ref["name"]
                  and json_equal(generated[j].get("arguments"), ref["arguments"])), None)
        if j is not None:
            exact[i] = j
            free.remove(j)
    for i, ref in enumerate(reference):
        if i not in exact:
            j = next((j for j in free if generated[j]["name"] == ref["name"]), None)
            if j is not None:
                named[i] = j
                free.remove(j)
    return [(ref["name"], i in exact or i in named, i in exact) for i, ref in enumerate(reference)]


def verdict(reference: dict, parsed) -> Verdict:
    """One reply against its reference turn."""
    if not reference.get("tool_calls"):
        return "call instead of text" if parsed.attempted else "text"
    if not parsed.attempted:
        return "no call"
    if not (parsed.parseable and parsed.calls):
        return "unparseable"
    pairs = pair_calls(reference["tool_calls"], parsed.calls)
    if len(parsed.calls) != len(pairs) or not all(named for _, named, _ in pairs):
        return "wrong function"
    return "right call" if all(exact for _, _, exact in pairs) else "wrong arguments"


def toolcall_prompts(conversations: list[list[dict]]) -> list[tuple[Conversation, dict]]:
    """(prompt, reference) for every assistant turn: the prompt is everything before that turn."""
    out = []
    for conv in conversations:
        conv = conv if isinstance(conv, Conversation) else Conversation(conv)
        out += [(conv[:i], m) for i, m in enumerate(conv) if m["role"] == "assistant"]
    return out


def _rate(hits: int, total: int) -> float:
    return hits / total if total else 0.0


def score_replies(pairs: list[tuple[Conversation, dict]], replies: list[str],
                  parse: Callable[[str], ParsedCalls]) -> dict:
    """Verdicts, the four rates with their counts, and per-function tables (no model needed)."""
    if len(replies) != len(pairs):
        raise SFTError(f"{len(replies)} replies for {len(pairs)} tool-call prompts; they must match")
    records, per_fn = [], {}
    for k, ((_, ref), reply) in enumerate(zip(pairs, replies)):
        parsed = parse(reply)
        v = verdict(ref, parsed)
        expected = [c["name"] for c in ref.get("tool_calls") or []]
        readable = v in ("right call", "wrong arguments", "wrong function")
        for name, named, exact in pair_calls(ref.get("tool_calls") or [], parsed.calls if readable else []):
            row = per_fn.setdefault(name, [0, 0, 0])
            row[0] += 1
            row[1] += named
            row[2] += exact
        records.append({"turn": k, "expected": expected or "text", "verdict": v, "reply": reply,
                        "calls": list(parsed.calls), "problem": parsed.problem})
    counts = Counter(r["verdict"] for r in records)
    n_call = sum(counts[v] for v in CALL_VERDICTS)
    n_text = sum(counts[v] for v in TEXT_VERDICTS)
    parsed_n = counts["right call"] + counts["wrong arguments"] + counts["wrong function"]
    named_n = counts["right call"] + counts["wrong arguments"]
    metrics = {
        "call_parse_rate": _rate(parsed_n, n_call),
        "call_name_acc": _rate(named_n, n_call),
        "call_args_acc": _rate(counts["right call"], n_call),
        "text_no_call_rate": _rate(counts["text"], n_text),
        "n_call_turns": n_call, "n_text_turns": n_text,
        "n_parsed": parsed_n, "n_right_name": named_n, "n_right_args": counts["right call"],
        "n_no_call": counts["text"],
    }
    verdict_rows = [[v, counts[v]] for v in CALL_VERDICTS + TEXT_VERDICTS]
    fn_rows = [[name, n, named, exact] for name, (n, named, exact) in sorted(per_fn.items())]
    return {"metrics": metrics,
            "tables": {"verdicts": {"header": ["verdict", "n"], "rows": verdict_rows},
                       "per function": {"header": ["function", "reference calls", "right name", "right arguments"],
                                        "rows": fn_rows}},
            "records": records}


def evaluate_toolcalls(conversations: list[list[dict]], generate: Callable[[list[Conversation]], list[str]],
                       parse: Callable[[str], ParsedCalls], limit: int | None = None) -> dict:
    """Prompt at every assistant turn, generate once per prompt (one batched call), score the replies.

    limit: score only the first `limit` turns (prompts), which is what generation time depends on.
    """
    pairs = toolcall_prompts(conversations)
    if limit:
        pairs = pairs[:limit]
    result = score_replies(pairs, generate([p for p, _ in pairs]), parse)
    result["config"] = {"conversations": len(conversations), "limit": limit}
    return result
