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
"""
from __future__ import annotations

from enum import Enum
from typing import Literal

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
