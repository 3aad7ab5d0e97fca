"""Dataset files -> conversations: one shape for every format.

Every instruction dataset ends up as a *conversation* (data/conversation.py): a list of messages
`{"role": "system"|"user"|"assistant"|"tool", "content": str}` -- an optional system message, then
user and assistant alternating, user first, assistant last; an assistant message may carry
`tool_calls` and `reasoning`, and is then followed by its `tool` results and another assistant
message. A `Conversation` is a list that also carries the tool schemas (`.tools`). The templates
(data/templates.py) and the masking only ever see that shape, so adding a format never touches them.

Formats read (JSON list, or JSONL with one record per line):
- alpaca:  {"instruction", "input", "output"} (+ optional "system", "history": [[q, a], ...]);
           the user turn is the instruction, then a blank line and the input when there is one.
           Stanford's seed tasks ({"instruction", "instances": [{"input", "output"}, ...]}) are read
           the same way from their first instance (the others are extra examples of the same task).
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}; user/assistant too.
           LLaMA-Factory's tool turns: "function_call" (value = JSON {"name", "arguments"}, an
           assistant tool call) and "observation" (a tool result); record-level "system" and
           "tools" (a list or a JSON string of one).
- openai:  {"messages": [{"role", "content"}, ...]} (+ record-level "tools"); assistant
           "tool_calls", "reasoning_content", content null beside tool calls; role "tool" with
           "tool_call_id"/"name"; content may be a list of typed parts ("text" | "reasoning" |
           "tool_call"). How tool data is read and checked: data/formats_tools.py.
- oasst:   OpenAssistant message trees, nested (`*.trees.jsonl`: {"prompt": message with "replies"})
           or flat (one message per record linked by "parent_id"). A tree holds many conversations:
           by default we follow the best-ranked reply at each step (rank 0 first; messages not yet
           ranked come after ranked ones, in file order), or, with paths="all", every root-to-leaf
           path. Deleted messages and messages whose review failed or is missing are dropped
           (`keep_unreviewed=True` keeps the missing ones), and `lang="en"` keeps one language.
           A path is cut after its last assistant reply; a path with none gives no conversation.

In every format, `<think>...</think>` at the start of an assistant's text becomes its `reasoning`
(split as Qwen3's template does). A conversation that ends in user or tool turns loses them (there
is no answer to train on). `data.formats_tools.tool_report(conversations)` counts what was loaded
and the calls to functions a conversation does not declare (a warning, not an error: real data
has them).

Errors are raised where the bad record enters and name the file and the line (JSONL) or the
record index (JSON list): `data.jsonl:17: ...`. `format="auto"` looks at the first record;
pass the format name to override it. A file holds one format: with "auto", a later record that
is plainly of another format (a ShareGPT record in an Alpaca file) is an error naming its line.

Reading streams: a JSONL file is read one line at a time and never held whole (a million-line
file costs one record of memory), a JSON list is parsed once. `open_records` + `record_conversations`
are the two halves of `iter_conversations`, so data/pipeline.py can read in one process and
convert in many (flat OASST messages are the exception: only the whole file links them).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator, NamedTuple

from data.conversation import ROLES, Conversation, tools_of
from data.conversation import validate_conversation
from data.formats_tools import openai_message, parse_tools, split_think, tool_calls_from_value
from model.errors import SFTError
from model.files import first_char, iter_jsonl, read_json

FORMATS = ("alpaca", "sharegpt", "openai", "oasst")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}


def iter_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) from a JSON list or a JSONL file, one at a time; `where` is `path:LINE`
    (JSONL, streamed line by line) or `path record I` (a JSON list, parsed once)."""
    path = Path(path)
    if first_char(path, "data file") != "[":
        for lineno, r in iter_jsonl(path, "data file"):
            yield f"{path}:{lineno}", r
        return
    data = read_json(path, "data file")
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise SFTError(f"{path} record {i}: expected a JSON object, got {type(r).__name__}")
    for i, r in enumerate(data):
        yield f"{path} record {i}", r


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """Every (where, record) of a file (see iter_records)."""
    return list(iter_records(path))


def detect_format(record: dict, where: str = "record") -> str:
    """The format of one record, from its keys."""
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record and ("output" in record or "instances" in record):
        return "alpaca"
    if ("message_tree_id" in record and "prompt" in record) or "replies" in record or "parent_id" in record:
        return "oasst"
    raise SFTError(f"{where}: cannot tell the format from keys {sorted(record)[:8]}; "
                   f"pass format= one of {', '.join(FORMATS)}")


def _str(record: dict, key: str, where: str, default: str | None = None) -> str:
    value = record.get(key, default)
    if not isinstance(value, str):
        raise SFTError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    return value


def from_alpaca(record: dict, where: str) -> list[dict]:
    if "instances" in record and "output" not in record:  # Stanford seed task
        inst = record["instances"]
        if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict):
            raise SFTError(f"{where}: 'instances' must be a non-empty list of {{input, output}}")
        record = {"instruction": record["instruction"], **inst[0]}
    user = _str(record, "instruction", where)
    extra = _str(record, "input", where, "") if record.get("input") is not None else ""  # null == ""
    if extra.strip():
        user = user + "\n\n" + extra
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _str(record, "system", where)})
    for pair in record.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise SFTError(f"{where}: 'history' must be a list of [question, answer] string pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": user},
                       {"role": "assistant", "content": _str(record, "output", where)}]


def from_sharegpt(record: dict, where: str) -> Conversation:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise SFTError(f"{where}: 'conversations' must be a list")
    messages = []
    for i, t in enumerate(turns):
        who = str(t.get("from", t.get("role")) if isinstance(t, dict) else None).lower()
        if who not in SHAREGPT_ROLES:
            raise SFTError(f"{where}: turn {i} has speaker {who!r}; known: {', '.join(SHAREGPT_ROLES)}")
        value = _str(t, "value" if "value" in t else "content", f"{where} turn {i}")
        if who == "function_call":
            calls = tool_calls_from_value(value, f"{where}: turn {i} (function_call) value")
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": SHAREGPT_ROLES[who], "content": value})
    if record.get("system") and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": _str(record, "system", where)})
    return Conversation(messages, parse_tools(record.get("tools"), where))


def from_openai(record: dict, where: str) -> Conversation:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise SFTError(f"{where}: 'messages' must be a list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise SFTError(f"{where}: message {i} needs role {'/'.join(ROLES)}, got {m!r:.80}")
        out.append(openai_message(m, f"{where}: message {i}"))
    return Conversation(out, parse_tools(record.get("tools"), where))


# ---- OpenAssistant trees ----

def _usable(msg: dict, lang, keep_unreviewed: bool) -> bool:
    if msg.get("deleted"):
        return False
    review = msg.get("review_result")
    if not (review or (review is None and keep_unreviewed)):
        return False
    return lang is None or msg.get("lang") in lang


def _children(msg: dict, lang, keep_unreviewed: bool) -> list[dict]:
    """Usable replies, best first: rank 0, 1, ...; unranked (rank None) after, in file order."""
    kids = [c for c in msg.get("replies") or [] if _usable(c, lang, keep_unreviewed)]
    return sorted(kids, key=lambda c: (c.get("rank") is None, c.get("rank") or 0))


def _paths(msg: dict, best_only: bool, lang, keep_unreviewed: bool) -> list[list[dict]]:
    kids = _children(msg, lang, keep_unreviewed)
    if not kids:
        return [[msg]]
    return [[msg] + p for k in (kids[:1] if best_only else kids) for p in _paths(k, best_only, lang, keep_unreviewed)]


def _path_to_conversation(path: list[dict], where: str) -> list[dict] | None:
    roles = {"prompter": "user", "assistant": "assistant"}
    messages = []
    for m in path:
        if m.get("role") not in roles or not isinstance(m.get("text"), str):
            raise SFTError(f"{where}: message {m.get('message_id')} needs role prompter/assistant and a text")
        messages.append({"role": roles[m["role"]], "content": m["text"]})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages or None


def from_oasst_tree(root: dict, where: str, paths: str = "best", lang=None,
                    keep_unreviewed: bool = False) -> list[list[dict]]:
    """Conversations of one message tree (root = the prompt message with nested 'replies')."""
    if not _usable(root, lang, keep_unreviewed):
        return []
    found = _paths(root, paths == "best", lang, keep_unreviewed)
    return [c for c in (_path_to_conversation(p, where) for p in found) if c]


def _nest_flat_messages(records: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Flat OASST messages (parent_id links) -> nested roots, keeping file order among siblings."""
    by_id, roots = {}, []
    for where, r in records:
        if "message_id" not in r:
            raise SFTError(f"{where}: an OpenAssistant message needs 'message_id' and 'parent_id'")
        by_id[r["message_id"]] = (where, dict(r, replies=[]))
    for where, msg in by_id.values():
        parent = msg.get("parent_id")
        if parent is None:
            roots.append((where, msg))
        elif parent in by_id:
            by_id[parent][1]["replies"].append(msg)
        else:
            raise SFTError(f"{where}: parent_id {parent!r} is not a message in this file")
    return roots


def finish_conversation(messages: list[dict], where: str) -> Conversation:
    """Split <think> blocks, drop trailing turns that have no answer, check the order."""
    conv = Conversation([split_think(m, f"{where}: message {i}") for i, m in enumerate(messages)],
                        tools_of(messages))
    while conv and conv[-1]["role"] != "assistant":  # a trailing question or tool result has no answer
        conv.pop()
    if not conv:
        raise SFTError(f"{where}: the conversation has no assistant reply to train on")
    validate_conversation(conv, where)
    return conv


class Records(NamedTuple):
    """The records of a file, still unread, and what they hold."""
    format: str                         # alpaca | sharegpt | openai | oasst
    detected: bool                      # the format came from the first record ("auto")
    items: Iterator[tuple[str, dict]]   # (where, record), streamed
    whole_file: bool                    # flat OASST messages: only the whole file makes trees


def open_records(path: str | Path, format: str = "auto") -> Records | None:
    """The file's format (detected from the first record for "auto") and its records, or None
    when the file holds none."""
    items = iter_records(path)
    first = next(items, None)
    if first is None:
        return None
    detected = format == "auto"
    if detected:
        format = detect_format(first[1], first[0])
    if format not in FORMATS:
        raise SFTError(f"{path}: unknown format {format!r}; known: auto, {', '.join(FORMATS)}")
    flat = format == "oasst" and not ("prompt" in first[1] or "replies" in first[1])
    return Records(format, detected, itertools.chain([first], items), flat)


def _check_same_format(record: dict, where: str, format: str) -> None:
    """A file read as "auto" holds one format: a record plainly of another one is an error."""
    try:
        found = detect_format(record, where)
    except SFTError:
        return  # not recognisably anything: the converter names the missing key
    if found != format:
        raise SFTError(f"{where}: a {found} record in a file whose first record is {format}; one file "
                       "holds one format (split the file, or give its format to read it as one)")


def record_conversations(record: dict, where: str, format: str, *, detected: bool = False, paths: str = "best",
                         lang=None, keep_unreviewed: bool = False) -> list[Conversation]:
    """The conversations of one record of a `format` file: one, or a nested OASST tree's paths.
    detected: the format was read off the file's first record (checked against this one)."""
    if detected:
        _check_same_format(record, where, format)
    if format == "oasst":
        return [finish_conversation(c, where) for c in
                from_oasst_tree(record.get("prompt", record), where, paths, lang, keep_unreviewed)]
    convert = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "openai": from_openai}[format]
    try:
        return [finish_conversation(convert(record, where), where)]
    except KeyError as e:
        raise SFTError(f"{where}: missing key {e.args[0]!r} for format {format}") from None


def _oasst_options(paths: str, lang) -> list[str] | None:
    if paths not in ("best", "all"):
        raise SFTError(f"paths must be 'best' or 'all', got {paths!r}")
    return [lang] if isinstance(lang, str) else lang


def iter_conversations(path: str | Path, format: str = "auto", *, paths: str = "best", lang=None,
                       keep_unreviewed: bool = False, skip_invalid: bool = False,
                       parse_first: bool = False) -> Iterator[tuple[str, Conversation]]:
    """(where, conversation) for each conversation of a file, streamed (see load_conversations).
    parse_first: read every record before converting any (a broken line is reported before a
    bad record above it, at the cost of holding the records)."""
    lang = _oasst_options(paths, lang)
    records = open_records(path, format)
    if records is None:
        return
    if parse_first:
        records = records._replace(items=iter(list(records.items)))
    if records.whole_file:
        for where, root in _nest_flat_messages(list(records.items)):
            for c in from_oasst_tree(root, where, paths, lang, keep_unreviewed):
                yield where, finish_conversation(c, where)
        return
    for where, r in records.items:
        try:
            convs = record_conversations(r, where, records.format, detected=records.detected, paths=paths,
                                         lang=lang, keep_unreviewed=keep_unreviewed)
        except SFTError:
            if skip_invalid:
                continue
            raise
        for conv in convs:
            yield where, conv


def load_conversations(path: str | Path, format: str = "auto", *, paths: str = "best", lang=None,
                       keep_unreviewed: bool = False, skip_invalid: bool = False) -> list[Conversation]:
    """Read a dataset file into conversations (Conversation: a list of message dicts + `.tools`).

    format: "auto" or one of alpaca/sharegpt/openai/oasst. OASST options: paths="best"|"all",
    lang (a code or a list of codes), keep_unreviewed. skip_invalid=True drops records whose
    conversation is malformed (roles out of order, no assistant reply) instead of raising.
    """
    return [conv for _, conv in iter_conversations(path, format, paths=paths, lang=lang, keep_unreviewed=keep_unreviewed,
                                                   skip_invalid=skip_invalid, parse_first=True)]


def record_texts(record: dict, where: str = "record") -> list[str]:
    """Every non-empty text of one record, for checks that must see all the text a file holds
    (tokenizer parity and speed): each message of a whole OASST tree (every branch, deleted and
    unreviewed ones too), each message of an Alpaca, ShareGPT or OpenAI record (as
    `load_conversations` builds them), each turn of an MT-Bench question ({"turns": [...]})."""
    if isinstance(record.get("turns"), list):
        return [t for t in record["turns"] if t]
    fmt = detect_format(record, where)
    if fmt == "oasst":
        msg = record.get("prompt", record)
        return [t for t in [msg.get("text"), *(t for r in msg.get("replies") or [] for t in record_texts(r, where))] if t]
    convert = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "openai": from_openai}[fmt]
    return [m["content"] for m in convert(record, where) if m["content"]]
