"""The chat templates that speak tools and thinking: Llama-3.1/3.2/3.3, Qwen2.5, Qwen3.

data/templates.py explains the idea (a hand-written function per family, byte-equal to its Jinja,
cutting the text into segments by Part); this module holds the four families whose templates
carry a function-calling protocol, and the inverse of that protocol, `parse_tool_calls`.

What a tool conversation looks like on the wire (user asks, assistant calls, tool answers,
assistant answers), `...` standing for the fixed instructions each template writes:

    Llama-3.1 / 3.2 / 3.3 (tools in the first user message, the Jinja default):
      <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n
      Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n<|eot_id|>
      <|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, ...{tool JSON, indent 4}
      \\n\\nWeather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
      {"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>          <- TOOL_CALL
      <|start_header_id|>ipython<|end_header_id|>\\n\\n"{\\"temp\\": 21}"<|eot_id|>  <- TOOL_RESULT, JSON-encoded
      <|start_header_id|>assistant<|end_header_id|>\\n\\nIt is 21 C.<|eot_id|>     <- ANSWER

    Qwen2.5 / Qwen3 (tools in the system message, one JSON line each):
      <|im_start|>system\\n...# Tools...<tools>\\n{tool JSON}\\n</tools>...<|im_end|>\\n
      <|im_start|>user\\nWeather in Paris?<|im_end|>\\n<|im_start|>assistant\\n
      <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call><|im_end|>\\n
      <|im_start|>user\\n<tool_response>\\n{"temp": 21}\\n</tool_response><|im_end|>\\n   <- results of one
      <|im_start|>assistant\\nIt is 21 C.<|im_end|>\\n                                    turn share a user turn

Llama templates write one call per assistant turn and no text beside it (their Jinja raises on
two calls and drops the text); we refuse both rather than lose data silently. Qwen writes any
number of `<tool_call>` blocks after the text.

Thinking (Qwen3 only). An assistant turn after the last user query is written
`<think>\\n{reasoning}\\n</think>\\n\\n{answer}` -- always on the final message, even with empty
reasoning, which teaches the model to close an empty think block when it has nothing to think --
and earlier turns lose their thinking. The reasoning comes from the message's `reasoning` field
or, as in the Jinja, from a `<think>...</think>` prefix of its content. `enable_thinking=False`
appends the empty block `<think>\\n\\n</think>\\n\\n` to the generation prompt, so the model answers
without thinking. Because earlier turns are rewritten, data/masking.py trains each turn in the
text the model saw when it wrote it.

Dates. The Llama system header says "Today Date: ..."; the Jinja uses `date_string` when given,
else a fixed "26 Jul 2024" (3.1/3.3) or today's date (3.2, through transformers' `strftime_now`).
We always default to "26 Jul 2024", so the same data renders to the same tokens on any day:
training data is reproducible. Pass `date_string` to render today's date instead.

Not reproduced: Llama's `builtin_tools` (brave_search, wolfram_alpha: `<|python_tag|>` calls and
`<|eom_id|>`), `custom_tools` and `tools_in_user_message=False`; Qwen3's tool-call arguments given
as a JSON string (our tool calls hold parsed dicts).
"""
from __future__ import annotations

import json
import re
from typing import NamedTuple

from data.conversation import Part, Segments, split_system
from model.errors import SFTError

LLAMA_DEFAULT_DATE = "26 Jul 2024"
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class RenderOptions(NamedTuple):
    """Everything a family function reads besides the messages (filled in by data.templates)."""
    name: str                     # the template name, for error messages
    where: str                    # the conversation's origin, for error messages
    bos: str
    eos: str
    tools: list[dict] | None      # the tool schemas; None = no tool list
    enable_thinking: bool | None
    date_string: str


def _tojson(value, indent: int | None = None) -> str:
    """transformers' `tojson` filter: json.dumps without ASCII escapes (and not Jinja's HTML-safe one)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


# ---- Llama-3.1 / 3.2 / 3.3 ----

_LLAMA_TOOLS_INTRO = ("Given the following functions, please respond with a JSON for a function call with its "
                      "proper arguments that best answers the given prompt.\n\n"
                      'Respond in the format {"name": function name, "parameters": dictionary of argument '
                      'name and its value}.Do not use variables.\n\n')


def _llama_header(role: str) -> str:
    return "<|start_header_id|>" + role + "<|end_header_id|>\n\n"


def _llama_call(m: dict, i: int, o: RenderOptions) -> str:
    """The one call of an assistant turn as the Llama Jinja writes it (refusing what it would lose)."""
    calls = m["tool_calls"]
    if len(calls) != 1:
        raise SFTError(f"{o.where}: message {i} has {len(calls)} tool calls; template {o.name!r} writes one call "
                       "per assistant turn (its Jinja raises); split them into separate turns or use qwen2.5/qwen3")
    if m["content"].strip():
        raise SFTError(f"{o.where}: message {i} has text and a tool call; template {o.name!r} writes only the call "
                       "(its Jinja drops the text); remove the text or use qwen2.5/qwen3")
    call = calls[0]
    return '{"name": "' + call["name"] + '", "parameters": ' + _tojson(call["arguments"]) + "}"


def llama31(messages: list[dict], gen: bool, o: RenderOptions) -> Segments:
    """Llama-3.1-8B / 3.3-70B / 3.2-3B-Instruct: their three Jinja sources differ only in what we do
    not reproduce (builtin_tools, today's date from strftime_now), so one function renders all."""
    system, turns = split_system(messages)
    offset = len(messages) - len(turns)
    head = o.bos + _llama_header("system") + ("Environment: ipython\n" if o.tools is not None else "")
    head += "Cutting Knowledge Date: December 2023\nToday Date: " + o.date_string + "\n\n"
    segs = [(head + (system or "").strip() + "<|eot_id|>", Part.CONTEXT)]
    if o.tools is not None:  # the tool list goes into the first user message
        if not turns:
            raise SFTError(f"{o.where}: template {o.name!r} puts the tool list in the first user message, "
                           "and the conversation has none")
        listing = "".join(_tojson(t, indent=4) + "\n\n" for t in o.tools)
        segs.append((_llama_header("user") + _LLAMA_TOOLS_INTRO + listing + turns[0]["content"].strip()
                     + "<|eot_id|>", Part.CONTEXT))
        turns, offset = turns[1:], offset + 1
    for i, m in enumerate(turns, offset):
        if m["role"] == "tool":  # a string is iterable, so the Jinja JSON-encodes it
            segs += [(_llama_header("ipython"), Part.CONTEXT), (_tojson(m["content"]), Part.TOOL_RESULT),
                     ("<|eot_id|>", Part.CONTEXT)]
        elif m.get("tool_calls"):
            segs += [(_llama_header("assistant"), Part.CONTEXT), (_llama_call(m, i, o) + "<|eot_id|>", Part.TOOL_CALL)]
        elif m["role"] == "assistant":
            segs += [(_llama_header("assistant"), Part.CONTEXT), (m["content"].strip() + "<|eot_id|>", Part.ANSWER)]
        else:
            segs.append((_llama_header(m["role"]) + m["content"].strip() + "<|eot_id|>", Part.CONTEXT))
    if gen:
        segs.append((_llama_header("assistant"), Part.CONTEXT))
    return segs


# ---- Qwen2.5 / Qwen3 (ChatML with tools) ----

_QWEN_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_QWEN_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                     "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")


def _qwen_tool_list(tools: list[dict]) -> str:
    return _QWEN_TOOLS_INTRO + "".join("\n" + _tojson(t) for t in tools) + _QWEN_TOOLS_OUTRO


def _qwen_assistant(shown: str, think: str, calls: list[dict], text_before_calls: bool) -> Segments:
    """`<|im_start|>assistant\\n` [think block] [text] [<tool_call> blocks] `<|im_end|>` `\\n`.

    A call is preceded by "\\n" unless it is the first and no text precedes it (then the header's
    own newline separates them); the end marker joins the last model-written segment.
    """
    segs = [("<|im_start|>assistant\n", Part.CONTEXT)]
    if think:
        segs.append((think, Part.REASONING))
    if shown or not calls:
        segs.append((shown, Part.ANSWER))
    for k, call in enumerate(calls):
        sep = "\n" if (k > 0 or text_before_calls) else ""
        segs.append((sep + '<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + _tojson(call["arguments"])
                     + "}\n</tool_call>", Part.TOOL_CALL))
    segs[-1] = (segs[-1][0] + "<|im_end|>", segs[-1][1])
    return segs + [("\n", Part.CONTEXT)]


def _qwen_tool_result(messages: list[dict], i: int) -> Segments:
    """Consecutive tool results share one user turn, each in its own <tool_response> block."""
    opens = i == 0 or messages[i - 1]["role"] != "tool"
    closes = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
    return [(("<|im_start|>user" if opens else "") + "\n<tool_response>\n", Part.CONTEXT),
            (messages[i]["content"], Part.TOOL_RESULT),
            ("\n</tool_response>" + ("<|im_end|>\n" if closes else ""), Part.CONTEXT)]


def _qwen_body(messages: list[dict], assistant) -> Segments:
    """The turns after the system header; `assistant(i, m)` renders assistant message i."""
    segs: Segments = []
    for i, m in enumerate(messages):
        if m["role"] == "user":
            segs.append(("<|im_start|>user\n" + m["content"] + "<|im_end|>\n", Part.CONTEXT))
        elif m["role"] == "assistant":
            segs += assistant(i, m)
        elif m["role"] == "tool":
            segs += _qwen_tool_result(messages, i)
    return segs


def qwen25(messages: list[dict], gen: bool, o: RenderOptions) -> Segments:
    """Qwen2.5-7B-Instruct: ChatML with a default system prompt and Hermes-style tool calls."""
    system, _ = split_system(messages)
    system = QWEN25_DEFAULT_SYSTEM if system is None else system
    head = "<|im_start|>system\n" + system + ("\n\n" + _qwen_tool_list(o.tools) if o.tools else "<|im_end|>\n")

    def assistant(i: int, m: dict) -> Segments:
        return _qwen_assistant(m["content"], "", m.get("tool_calls") or [], bool(m["content"]))

    segs = [(head, Part.CONTEXT)] + _qwen_body(messages, assistant)
    return segs + [("<|im_start|>assistant\n", Part.CONTEXT)] if gen else segs


def _last_query_index(messages: list[dict]) -> int:
    """Qwen3's `ns.last_query_index`: the last user message that is not a wrapped tool response."""
    for i in range(len(messages) - 1, -1, -1):
        c = messages[i]["content"]
        if messages[i]["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            return i
    return len(messages) - 1


def split_think(content: str) -> tuple[str, str]:
    """(reasoning, answer) of a text that may open with `<think>...</think>`, as Qwen3's Jinja parses it."""
    if THINK_CLOSE not in content:
        return "", content
    head, answer = content.split(THINK_CLOSE)[0], content.split(THINK_CLOSE)[-1]
    return head.rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n"), answer.lstrip("\n")


def qwen3(messages: list[dict], gen: bool, o: RenderOptions) -> Segments:
    """Qwen3-0.6B (the Qwen3 hybrid-thinking template): no default system prompt, <think> blocks."""
    system, _ = split_system(messages)
    if o.tools:
        head = "<|im_start|>system\n" + ("" if system is None else system + "\n\n") + _qwen_tool_list(o.tools)
    else:
        head = "" if system is None else "<|im_start|>system\n" + system + "<|im_end|>\n"
    last_query = _last_query_index(messages)

    def assistant(i: int, m: dict) -> Segments:
        content, reasoning = m["content"], m.get("reasoning")
        if reasoning is None:  # as the Jinja: a <think>...</think> prefix of the content
            reasoning, content = split_think(content)
        think, shown = "", content
        if i > last_query and (i == len(messages) - 1 or reasoning):
            think, shown = THINK_OPEN + "\n" + reasoning.strip("\n") + "\n" + THINK_CLOSE + "\n\n", content.lstrip("\n")
        return _qwen_assistant(shown, think, m.get("tool_calls") or [], bool(content))

    segs = [(head, Part.CONTEXT)] + _qwen_body(messages, assistant)
    if gen:
        segs.append(("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if o.enable_thinking is False else ""),
                     Part.CONTEXT))
    return segs


TOOL_FAMILIES = {"llama3.1": llama31, "llama3.2": llama31, "qwen2.5": qwen25, "qwen3": qwen3}
THINKING_FAMILIES = ("qwen3",)
DATED_FAMILIES = ("llama3.1", "llama3.2")
# What ends an assistant turn: Llama's <|eom_id|> ends a turn that waits for a tool (ipython mode);
# Qwen's base-model <|endoftext|> is what a Qwen model emits when it ignores the chat markup.
TOOL_FAMILY_STOPS = {"llama3.1": ["<|eot_id|>", "<|eom_id|>"], "llama3.2": ["<|eot_id|>", "<|eom_id|>"],
                     "qwen2.5": ["<|im_end|>", "<|endoftext|>"], "qwen3": ["<|im_end|>", "<|endoftext|>"]}


# ---- reading a generated reply back into tool calls ----

class ParsedCalls(NamedTuple):
    """What a generated assistant reply calls.

    calls: the well-formed calls, [{"name": str, "arguments": dict}], in order.
    attempted: the reply uses the template's call syntax (Llama: the reply is a JSON object;
        Qwen: it contains `<tool_call>`), whether or not it parses.
    parseable: attempted, and every attempt is a well-formed call (False when nothing was attempted).
    problem: why not parseable ("" when it is).
    """
    calls: list[dict]
    attempted: bool
    parseable: bool
    problem: str = ""


def _as_call(obj, args_key: tuple[str, ...]) -> tuple[dict | None, str]:
    """A parsed JSON value -> ({"name", "arguments"}, "") or (None, what is wrong)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None, "the call has no string 'name'"
    args = next((obj[k] for k in args_key if k in obj), None)
    if isinstance(args, str):  # arguments written as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None, f"the arguments of {obj['name']!r} are a string that is not JSON"
    if not isinstance(args, dict):
        return None, f"the call of {obj['name']!r} has no {' or '.join(map(repr, args_key))} object"
    return {"name": obj["name"], "arguments": args}, ""


def _strip_stops(text: str, stops: list[str]) -> str:
    text = text.strip()
    for stop in stops:
        if text.endswith(stop):
            text = text[:-len(stop)].rstrip()
    return text


def _parse_llama(text: str) -> ParsedCalls:
    body = _strip_stops(text, TOOL_FAMILY_STOPS["llama3.1"])
    body = body.removeprefix("<|python_tag|>").lstrip()  # Llama-3.1 may open a call with it
    if not body.startswith("{"):
        return ParsedCalls([], False, False, "no call (the reply is not a JSON object)")
    try:
        obj = json.loads(body)
    except ValueError as e:
        return ParsedCalls([], True, False, f"the call is not valid JSON ({e.msg} at char {e.pos})")
    call, problem = _as_call(obj, ("parameters", "arguments"))
    return ParsedCalls([call], True, True) if call else ParsedCalls([], True, False, problem)


_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def _parse_qwen(text: str) -> ParsedCalls:
    body = _strip_stops(text, TOOL_FAMILY_STOPS["qwen3"]).split(THINK_CLOSE)[-1]  # thinking is not a call
    if "<tool_call>" not in body:
        return ParsedCalls([], False, False, "no <tool_call> block")
    calls, problems = [], []
    blocks = _TOOL_CALL_BLOCK.findall(body)
    if body.count("<tool_call>") != len(blocks):
        problems.append("a <tool_call> block is not closed")
    for block in blocks:
        try:
            call, problem = _as_call(json.loads(block), ("arguments", "parameters"))
        except ValueError as e:
            call, problem = None, f"a <tool_call> block is not valid JSON ({e.msg} at char {e.pos})"
        if call:
            calls.append(call)
        else:
            problems.append(problem)
    return ParsedCalls(calls, True, not problems, "; ".join(problems))


def parse_tool_calls(name: str, text: str) -> ParsedCalls:
    """The tool calls in a generated assistant reply, read with the inverse of template `name`'s syntax.

    `text` is what the model wrote after the generation prompt (a trailing end-of-turn string is
    ignored). Llama-3.x: the whole reply is one JSON object {"name", "parameters" (or "arguments")},
    optionally after <|python_tag|>. Qwen2.5/Qwen3: every `<tool_call>{json}</tool_call>` block,
    with text before the calls allowed and a leading <think> block ignored.
    """
    if name not in TOOL_FAMILIES:
        raise SFTError(f"template {name!r} has no tool-call syntax to parse; templates with tools: "
                       f"{', '.join(TOOL_FAMILIES)}")
    return _parse_llama(text) if name.startswith("llama") else _parse_qwen(text)
