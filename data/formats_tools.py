"""Tool calls, tool results and reasoning in dataset files -> the conversation model.

Datasets write the same three things in four layouts; every one becomes the shape of
data/conversation.py (assistant `tool_calls` [{"name", "arguments": dict}], `reasoning`, role
`tool`, and `Conversation.tools`):

    OpenAI messages   {"role": "assistant", "content": null, "reasoning_content": "...",
                       "tool_calls": [{"id": "c1", "type": "function",
                                       "function": {"name": "f", "arguments": "{\\"x\\": 1}"}}]}
                      {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "42"}
    LLaMA-Factory     {"from": "function_call", "value": "{\\"name\\": \\"f\\", \\"arguments\\": {...}}"}
    ShareGPT          {"from": "observation", "value": "42"}        (a list value = parallel calls)
    typed parts       {"role": "assistant", "content": [{"type": "reasoning", "value": "..."},
                                                        {"type": "tool_call", "value": "{...}"}]}
    <think> in text   {"role": "assistant", "content": "<think>\\nplan\\n</think>\\n\\nanswer"}

Pitfalls this file exists for:
- `arguments` arrive as a JSON *string* (OpenAI) or an object (LLaMA-Factory), sometimes a string
  inside a string. They are parsed once, here, where a bad one can be named by file, record and
  field; templates then serialise the dict the way each family's Jinja does.
- `tools` arrive as a list or as a JSON string of one (both shared LLaMA-Factory files), and a
  schema is either OpenAI-wrapped {"type": "function", "function": {...}} or bare {"name", ...}
  (Glaive). Bare ones are wrapped, as LLaMA-Factory does before rendering, so templates see one
  layout; the schema itself is kept as given (even `"type": "dict"` parameters). No tools, `[]`
  or `""` become None.
- `<think>` is split as Qwen3's chat template does: reasoning = the text before the first
  `</think>`, after `<think>` if there is one (DeepSeek-R1 outputs have only the closing tag),
  newlines trimmed; the answer = the text after `</think>`, leading newlines trimmed. Text that
  Qwen3 would silently drop (words before `<think>`, a second block) is an error instead.
- A typed-parts turn keeps reasoning before the answer and calls after it, because that is the
  only order the conversation model (and every template) can represent; any other order is an
  error, never a silent reordering.
- A call to a function not in `tools` is real data, not a mistake (models get asked about
  functions they do not have): `tool_report` counts it so the caller can print a warning.

Order of messages (data.conversation.validate_conversation): an optional system message, then
user and assistant alternating, user first; an assistant message that calls tools is followed by
one or more `tool` messages, then by an assistant message again:

    system? (user assistant | user (assistant+calls tool+)+ assistant)*
"""
from __future__ import annotations

import json
from collections import Counter
from typing import NamedTuple

from data.conversation import tools_of
from data.tool_templates import split_think as split_reasoning
from model.errors import SFTError

PART_ORDER = {"reasoning": 0, "text": 1, "tool_call": 2}  # the order parts may appear in a turn


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def parse_json(text: str, where: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SFTError(f"{where}: {what}: not valid JSON ({e.msg} at char {e.pos}): {text[:60]!r}") from None


# ---- tool calls and schemas ----

def to_tool_call(entry, where: str) -> dict:
    """One call -> {"name", "arguments": dict} (+ "id"). Takes OpenAI's {"id", "type": "function",
    "function": {"name", "arguments"}}, a flat {"name", "arguments"|"parameters"}, or either as a JSON string."""
    if isinstance(entry, str):
        entry = parse_json(entry, where, "the tool call")
    if not isinstance(entry, dict):
        raise SFTError(f"{where}: a tool call must be an object {{\"name\", \"arguments\"}}, got {_kind(entry)}")
    if entry.get("type", "function") != "function":
        raise SFTError(f"{where}: tool call type {entry['type']!r}; only 'function' calls are supported")
    fn = entry.get("function", entry)
    if not isinstance(fn, dict):
        raise SFTError(f"{where}: 'function' must be an object {{\"name\", \"arguments\"}}, got {_kind(fn)}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise SFTError(f"{where}: the tool call has no 'name' (the function's name as a string)")
    args = fn["arguments"] if "arguments" in fn else fn.get("parameters")  # Llama-3.1 writes "parameters"
    if isinstance(args, str):
        args = parse_json(args, where, f"arguments of {name!r}")
    if not isinstance(args, dict):
        raise SFTError(f"{where}: arguments of {name!r} must be a JSON object, got {_kind(args)}")
    call = {"name": name, "arguments": args}
    if isinstance(entry.get("id"), str):
        call["id"] = entry["id"]
    return call


def tool_calls_from_value(value, where: str) -> list[dict]:
    """A LLaMA-Factory `function_call` value: one call, or a list of parallel calls, as JSON."""
    if isinstance(value, str):
        value = parse_json(value, where, "the function_call value")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise SFTError(f"{where}: the function_call value is an empty list; give at least one call")
    return [to_tool_call(c, f"{where}[{k}]" if isinstance(value, list) else where) for k, c in enumerate(items)]


def parse_tools(value, where: str) -> list[dict] | None:
    """A record's `tools` (a list or a JSON string of one) -> OpenAI-wrapped schemas, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = parse_json(value, where, "tools")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise SFTError(f"{where}: tools must be a list of function schemas (objects), got "
                       f"{_kind(value) if not isinstance(value, list) else 'a list holding non-objects'}")
    schemas = []
    for i, t in enumerate(value):
        schema = t if "function" in t else {"type": "function", "function": t}  # Glaive: bare schemas
        fn = schema["function"]
        if schema.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise SFTError(f"{where}: tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                           "\"parameters\", ...}} or a bare {\"name\", \"parameters\", ...} schema")
        schemas.append(schema)
    return schemas or None


def declared_names(tools: list[dict] | None) -> set[str]:
    return {t["function"]["name"] for t in tools or []}


# ---- messages ----

def _part_value(part: dict, kind: str, where: str):
    value = part["value"] if "value" in part else part.get("text")  # OpenAI text parts use "text"
    if kind != "tool_call" and not isinstance(value, str):
        raise SFTError(f"{where}: a {kind} part needs a string 'value', got {_kind(value)}")
    return value


def message_from_parts(role: str, parts: list, where: str) -> dict:
    """A turn whose content is typed parts -> one message (reasoning, then text, then calls)."""
    texts, reasoning, calls, last = [], None, [], 0
    for j, part in enumerate(parts):
        at = f"{where} content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise SFTError(f"{at}: expected a part {{\"type\", \"value\"}}, got {_kind(part)}")
        kind = part["type"]
        if kind not in PART_ORDER:
            raise SFTError(f"{at}: unknown part type {kind!r}; known: {', '.join(PART_ORDER)}")
        if role != "assistant" and kind != "text":
            raise SFTError(f"{at}: a {role} message can only hold text parts, got {kind!r}")
        if PART_ORDER[kind] < last or (kind == "reasoning" and reasoning is not None):
            raise SFTError(f"{at}: {kind!r} part out of order; a turn holds at most one reasoning part, "
                           "then text, then tool calls")
        last = PART_ORDER[kind]
        value = _part_value(part, kind, at)
        if kind == "reasoning":
            reasoning = value
        elif kind == "text":
            texts.append(value)
        else:
            calls.append(to_tool_call(value, at))
    msg = {"role": role, "content": "".join(texts)}
    if reasoning is not None:
        msg["reasoning"] = reasoning
    if calls:
        msg["tool_calls"] = calls
    return msg


def openai_message(m: dict, where: str) -> dict:
    """One OpenAI-layout message (role already checked) -> our message."""
    role, content = m["role"], m.get("content")
    if "function_call" in m:
        raise SFTError(f"{where}: legacy 'function_call'; write it as tool_calls [{{\"type\": \"function\", "
                       "\"function\": {\"name\", \"arguments\"}}]")
    if role != "assistant" and ("tool_calls" in m or "reasoning_content" in m):
        raise SFTError(f"{where}: only assistant messages may hold tool_calls or reasoning_content")
    if isinstance(content, list):
        msg = message_from_parts(role, content, where)
    elif isinstance(content, str) or (content is None and role == "assistant" and m.get("tool_calls")):
        msg = {"role": role, "content": content or ""}
    else:
        raise SFTError(f"{where}: 'content' must be a string or a list of typed parts, got {_kind(content)} "
                       "(null only for an assistant message with tool_calls)")
    if role == "assistant":
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            raise SFTError(f"{where}: tool_calls must be a list, got {_kind(calls)}")
        calls = [to_tool_call(c, f"{where} tool_calls[{k}]") for k, c in enumerate(calls)]
        if calls:
            msg["tool_calls"] = msg.get("tool_calls", []) + calls
        reasoning = m.get("reasoning_content", m.get("reasoning"))
        if reasoning is not None:
            if not isinstance(reasoning, str) or "reasoning" in msg:
                raise SFTError(f"{where}: reasoning_content must be one string (not also a reasoning part)")
            msg["reasoning"] = reasoning
    if role == "tool":
        for key in ("name", "tool_call_id"):
            if key in m:
                if not isinstance(m[key], str):
                    raise SFTError(f"{where}: {key} must be a string, got {_kind(m[key])}")
                msg[key] = m[key]
    return msg


def split_think(message: dict, where: str) -> dict:
    """An assistant message whose text holds `<think>...</think>` -> reasoning + answer (as Qwen3).

    A message that already has its reasoning keeps its text as it is, tags and all, as Qwen3's
    template does with `reasoning_content` (the shared reason_tool_use file has two such stray tags).
    """
    text = message.get("content")
    if (message.get("role") != "assistant" or "reasoning" in message or not isinstance(text, str)
            or "</think>" not in text):
        return message
    head = text.split("</think>")[0]
    before = head.split("<think>")[0] if "<think>" in head else ""  # Qwen3 drops this text
    if text.count("</think>") > 1 or before.strip():
        raise SFTError(f"{where}: expected one <think>...</think> block at the start of the answer; "
                       "text outside it would be lost")
    reasoning, answer = split_reasoning(text)  # the one parser, the template's own
    return {**message, "content": answer, "reasoning": reasoning}


# ---- what was loaded ----

class ToolReport(NamedTuple):
    """Counts over loaded conversations, and the one warning: calls to undeclared functions."""
    conversations: int
    with_tools: int      # conversations that declare tools
    call_turns: int      # assistant messages that call tools
    tool_calls: int      # calls in all (a turn may hold several)
    tool_results: int    # `tool` messages
    reasoning: int       # assistant messages that carry reasoning
    undeclared: Counter  # function name -> calls to it in conversations whose tools lack it

    def summary(self) -> str:
        line = (f"{self.conversations} conversations ({self.with_tools} with tools): {self.tool_calls} tool calls "
                f"in {self.call_turns} turns, {self.tool_results} tool results, {self.reasoning} with reasoning")
        n = sum(self.undeclared.values())
        if n:
            top = ", ".join(f"{name} x{k}" for name, k in self.undeclared.most_common(5))
            line += f"; warning: {n} calls to functions not in the conversation's tools ({top})"
        return line


def tool_report(conversations: list[list[dict]]) -> ToolReport:
    """Count tool calls, results and reasoning; collect calls to functions their tools do not declare."""
    undeclared, calls, turns, results, reasoning, with_tools = Counter(), 0, 0, 0, 0, 0
    for conv in conversations:
        known = declared_names(tools_of(conv))
        with_tools += bool(known)
        for m in conv:
            results += m["role"] == "tool"
            reasoning += "reasoning" in m
            turns += bool(m.get("tool_calls"))
            for c in m.get("tool_calls") or []:
                calls += 1
                if c["name"] not in known:
                    undeclared[c["name"]] += 1
    return ToolReport(len(conversations), with_tools, turns, calls, results, reasoning, undeclared)

