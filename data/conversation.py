"""The one shape every dataset becomes: a conversation of messages, with tools and reasoning.

    message    {"role": "system" | "user" | "assistant" | "tool", "content": str, ...}
    assistant  may also hold  "reasoning": str          the thinking text (Qwen3's <think> block,
                                                        DeepSeek-R1's reasoning_content), kept
                                                        apart from the answer in "content"
                              "tool_calls": [ToolCall]  functions it calls; "content" may be ""
    tool       a tool's result: "content" (the result as text), optional "name" (the function)
               and "tool_call_id"; it answers the nearest preceding assistant tool call
    ToolCall   {"name": str, "arguments": dict}  (+ optional "id"); arguments are a parsed JSON
               object, never a JSON string: the templates serialise them the way each family's
               Jinja does, so loaders parse strings once, where the bad ones can be named

A `Conversation` is a list of those messages that also carries `tools`, the JSON schemas of the
functions the assistant may call (OpenAI layout: {"type": "function", "function": {"name",
"description", "parameters"}}), or None. It subclasses list so every piece of code that walks
messages keeps working; slicing keeps the tools (a prompt cut from a tool conversation must still
show the model its tools), and so does `+`.

Templates (data/templates.py) turn a conversation into segments `(text, Part)`; the Part says
what the text is, so masking can decide what trains (data/masking.py) and data.inspect can
colour it. Only the model's own output trains by default: ANSWER (assistant text plus its
end-of-turn marker), TOOL_CALL, and REASONING unless `data.train_on_reasoning = false`.

`validate_conversation` checks the shape every template accepts (where a loader or a caller
hands a conversation over): an optional system message, then user and assistant alternating
from the user, tool results right after the assistant tool call they answer, and the fields
above with their types. A tool list with an empty `[]` is not the same as None: the Llama-3.1
Jinja still writes its tool preamble for `[]`, so loaders store None when a record has no tools.
"""
from __future__ import annotations

from enum import Enum
from typing import Literal

from model.errors import SFTError

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")


class Part(str, Enum):
    """What a piece of rendered text is (masking decides from this what trains)."""
    CONTEXT = "context"          # markup, system and user turns, the tool list, role headers
    TOOL_RESULT = "tool_result"  # what a tool returned (never trained: the model did not write it)
    REASONING = "reasoning"      # the assistant's thinking (trained unless train_on_reasoning=false)
    TOOL_CALL = "tool_call"      # an assistant's function call, as the template serialises it
    ANSWER = "answer"            # assistant text and its end-of-turn marker

    @property
    def written_by_model(self) -> bool:
        return self in (Part.REASONING, Part.TOOL_CALL, Part.ANSWER)


class Conversation(list):
    """Messages (a list of dicts, see the module docstring) plus `tools`: schemas or None."""

    def __init__(self, messages=(), tools: list[dict] | None = None):
        super().__init__(messages)
        self.tools = tools

    def __getitem__(self, index):
        got = super().__getitem__(index)
        return Conversation(got, self.tools) if isinstance(index, slice) else got

    def __add__(self, other):
        return Conversation(list(self) + list(other), self.tools)

    def __repr__(self) -> str:
        return f"Conversation({list.__repr__(self)}, tools={self.tools!r})"


def tools_of(messages: list[dict]) -> list[dict] | None:
    """The tool schemas a conversation carries (None for a plain list of messages)."""
    return getattr(messages, "tools", None)


Segments = list[tuple[str, Part]]  # a rendered conversation, cut where the Part changes


def tool_data_in(messages: list[dict], tools: list[dict] | None) -> str | None:
    """What a template without tool syntax would drop: "tool list", "assistant tool calls" or None.

    (Tool results need a preceding call in a valid conversation, so the calls name them too.)
    """
    if tools:
        return "tool list"
    if any(m.get("tool_calls") for m in messages):
        return "assistant tool calls"
    return None


def has_reasoning(messages: list[dict]) -> bool:
    """True when some assistant message carries thinking text in its `reasoning` field."""
    return any(m.get("reasoning") for m in messages)


# role of the previous message ("call" = an assistant message with tool calls) -> roles allowed next
NEXT_ROLES = {None: ("system", "user"), "system": ("user",), "user": ("assistant",), "assistant": ("user",),
              "call": ("tool",), "tool": ("tool", "assistant")}


def _check_message(m, i: int, where: str) -> None:
    at = f"{where}: message {i}"
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
        raise SFTError(f"{at} must be a dict with a string 'content'")
    if m.get("role") not in ROLES:
        raise SFTError(f"{at} has role {m.get('role')!r}; known: {', '.join(ROLES)}")
    for key in ("tool_calls", "reasoning"):
        if m.get(key) is not None and m["role"] != "assistant":
            raise SFTError(f"{at} ({m['role']}) has {key!r}; only assistant messages may")
    if m.get("reasoning") is not None and not isinstance(m["reasoning"], str):
        raise SFTError(f"{at}: 'reasoning' must be a string")
    for k, call in enumerate(m.get("tool_calls") or ()):
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"]
                and isinstance(call.get("arguments"), dict)):
            raise SFTError(f"{at} tool_calls[{k}]: a tool call is {{\"name\": str, \"arguments\": dict}} "
                           "(arguments parsed from JSON)")


def validate_conversation(messages: list[dict], where: str = "conversation", tools: list[dict] | None = None) -> None:
    """Raise SFTError unless the conversation has the shape every template accepts.

    Order: an optional system message, then user first; user -> assistant -> user ...; an
    assistant message with tool_calls is followed by its results (one or more `tool` messages,
    whose tool_call_id, when given, names one of those calls), and they by the next assistant
    message. A prompt may end anywhere; loaders require a training conversation to end with an
    assistant message. `tools` (default: the conversation's own) is a list of objects or None.
    Fields: a string `content` everywhere; `tool_calls` ([{"name": str, "arguments": dict}]) and
    `reasoning` (str) only on assistant messages.
    """
    if not isinstance(messages, list) or not messages:
        raise SFTError(f"{where}: a conversation must be a non-empty list of messages")
    tools = tools_of(messages) if tools is None else tools
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise SFTError(f"{where}: 'tools' must be a list of JSON schema objects, got {type(tools).__name__}")
    prev, call_ids = None, set()
    for i, m in enumerate(messages):
        _check_message(m, i, where)
        role, allowed = m["role"], NEXT_ROLES[prev]
        if role == "tool" and "tool" not in allowed:
            raise SFTError(f"{where}: message {i} is a tool result with no preceding tool call (a 'tool' "
                           "message follows an assistant message with tool_calls, or another tool result)")
        if role not in allowed:
            raise SFTError(f"{where}: message {i} has role {role!r}, expected {' or '.join(map(repr, allowed))} "
                           "(an optional system message, then user/assistant alternating, user first; "
                           "an assistant tool call is followed by its tool results)")
        if role == "tool" and call_ids and m.get("tool_call_id", "") not in call_ids | {""}:
            raise SFTError(f"{where}: message {i} answers tool_call_id {m['tool_call_id']!r}, but the calls "
                           f"before it have ids {sorted(call_ids)}")
        if role == "assistant":
            call_ids = {c["id"] for c in m.get("tool_calls") or [] if "id" in c}
        prev = "call" if role == "assistant" and m.get("tool_calls") else role


def split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """(the leading system message's content or None, the messages after it)."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages
