"""Chat templates, written by hand: a conversation -> the exact text a model was trained on.

A chat model only behaves if it sees, byte for byte, the markup it was fine-tuned with:
`[INST] ... [/INST]` for Llama-2, `<|im_start|>role\\n...<|im_end|>` for ChatML and Qwen, and so on.
The Hugging Face world stores that markup as a Jinja program in `tokenizer_config.json`
(`chat_template`). We do not run Jinja (no dependency, and Jinja cannot tell us which characters
belong to the answer). Instead each family is a small Python function that reproduces its Jinja
template exactly -- tests/parity/ renders both on the same conversations and compares bytes --
and that returns the text as *segments* `(text, Part)` (data/conversation.py):

    [("<s>### Instruction:\\nHi\\n\\n### Response:\\n", CONTEXT), ("Hello!</s>", ANSWER), ("\\n\\n", CONTEXT)]

The Part says what the text is: CONTEXT (markup, system and user turns, the tool list),
TOOL_RESULT (what a tool returned), REASONING (the assistant's thinking), TOOL_CALL and ANSWER.
`render()` joins the segments; `render_segments()` hands them to data/masking.py, which decides
from the Parts what trains. An assistant's ANSWER or TOOL_CALL segment includes the end-of-turn
marker that closes it (`</s>`, `<|im_end|>`, `<|eot_id|>`): a model that never learns to emit it
never stops. Everything before the turn -- the role header a generation prompt ends with -- is
context. Invariant (tested): the text before an assistant turn's first model-written segment
equals `render(messages_before_that_turn, add_generation_prompt=True)`, so training and
inference see the same prompt; each assistant turn is one run of model-written segments.

Families: alpaca, chatml, llama2, llama3 (Meta-Llama-3), mistral, zephyr, vicuna here; the four
with tool and thinking syntax -- llama3.1 (also Llama-3.3), llama3.2, qwen2.5, qwen3 -- in
data/tool_templates.py, which also parses generated tool calls back (`parse_tool_calls`). A
template without tool syntax refuses a conversation with tools, tool calls or tool results
rather than silently dropping them. A template without thinking syntax writes an assistant's
`reasoning` as a `<think>...</think>` block at the start of its answer (the DeepSeek-R1 layout,
and what `<think>` data looked like before a loader split it out), as REASONING text; only qwen3
has its own syntax for it.

BOS/EOS strings are part of the text, exactly where the Jinja template writes `bos_token` /
`eos_token`; the tokenizer maps those strings to their special ids. Pass the tokenizer's own
`bos_token`/`eos_token` (data/masking.py does) so a template never writes a special-token string
the tokenizer does not know.

System messages: every family here accepts one (Llama-2 and Mistral fold it into the first user
turn, Vicuna and Alpaca put it first, the others give it its own header) except mistral-legacy,
the Mistral-7B-Instruct-v0.2 template as released, whose Jinja raises on one: we refuse it by name.
The older Mistral-7B-Instruct-v0.1 template also rejects it ("Only user and assistant roles are
supported!"); its text differs from ours (`[INST]` without the leading space, a space after EOS),
so it is not mapped to any name (tests/parity/ shows it).

Conversations are validated the same way for every family (data.conversation.validate_conversation:
an optional leading system message, then user/assistant alternating from the user, tool results
after a tool call); some Jinja templates accept more, none of ours writes text for an invalid one.
"""
from __future__ import annotations

import re
from pathlib import Path

from data.conversation import (Part, Segments, has_reasoning, split_system, tool_data_in, tools_of,
                               validate_conversation)
from data.jinja_sources import KNOWN_JINJA  # name -> the Jinja source we reproduce (saved with models)
from data.tool_templates import (DATED_FAMILIES, LLAMA_DEFAULT_DATE, THINK_CLOSE, THINK_OPEN, THINKING_FAMILIES,
                                 TOOL_FAMILIES, TOOL_FAMILY_STOPS, RenderOptions)
from model.errors import SFTError
from model.files import read_json

# The bos/eos strings each family's own tokenizer uses; only used where the Jinja template writes
# `bos_token`/`eos_token` (Llama-3 and ChatML hard-code their turn markers instead; Qwen has no BOS).
FAMILY_TOKENS = {
    "alpaca": ("<s>", "</s>"),
    "chatml": ("<s>", "<|im_end|>"),
    "llama2": ("<s>", "</s>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "mistral-legacy": ("<s>", "</s>"),
    "zephyr": ("<s>", "</s>"),
    "vicuna": ("<s>", "</s>"),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3.2": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2.5": ("", "<|im_end|>"),
    "qwen3": ("", "<|im_end|>"),
}
VICUNA_DEFAULT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the user's questions.")
C, A = Part.CONTEXT, Part.ANSWER  # the only two Parts the tool-less families write


# ---- one function per family; each mirrors the Jinja template named in its docstring ----

def _alpaca(messages, gen, o: RenderOptions) -> Segments:
    """chujiezheng/chat_templates alpaca.jinja (lines stripped and joined)."""
    system, turns = split_system(messages)
    segs = [(o.bos + ("" if system is None else system.strip() + "\n\n"), C)]
    for m in turns:
        if m["role"] == "user":
            segs.append(("### Instruction:\n" + m["content"].strip() + "\n\n", C))
        else:
            segs += [("### Response:\n", C), (m["content"].strip() + o.eos, A), ("\n\n", C)]
    if gen:
        segs.append(("### Response:\n", C))
    return segs


def _chatml(messages, gen, o: RenderOptions) -> Segments:
    """OpenHermes-2.5 / ChatML: every message `<|im_start|>role\\ncontent<|im_end|>\\n`, no strip."""
    segs = []
    for m in messages:
        if m["role"] == "assistant":
            segs += [("<|im_start|>assistant\n", C), (m["content"] + "<|im_end|>", A), ("\n", C)]
        else:
            segs.append(("<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n", C))
    if gen:
        segs.append(("<|im_start|>assistant\n", C))
    return segs


def _llama2(messages, gen, o: RenderOptions) -> Segments:
    """Llama-2-chat: system inside the first user turn as `<<SYS>>\\n..\\n<</SYS>>\\n\\n`; no generation prompt."""
    system, turns = split_system(messages)
    segs = []
    for i, m in enumerate(turns):
        content = m["content"]
        if i == 0 and system is not None:
            content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
        if m["role"] == "user":
            segs.append((o.bos + "[INST] " + content.strip() + " [/INST]", C))
        else:
            segs.append((" " + content.strip() + " " + o.eos, A))
    return segs


def _llama3(messages, gen, o: RenderOptions) -> Segments:
    """Meta-Llama-3-Instruct: header per message, content trimmed, `<|eot_id|>` ends every turn."""
    segs = [(o.bos, C)]
    for m in messages:
        header = "<|start_header_id|>" + m["role"] + "<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            segs += [(header, C), (m["content"].strip() + "<|eot_id|>", A)]
        else:
            segs.append((header + m["content"].strip() + "<|eot_id|>", C))
    if gen:
        segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", C))
    return segs


def _mistral(messages, gen, o: RenderOptions) -> Segments:
    """Mixtral-8x7B-Instruct-v0.1 / Mistral-7B-Instruct-v0.2: system joins the first user turn; no strip."""
    system, turns = split_system(messages)
    segs = [(o.bos, C)]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = m["content"] if (i > 0 or system is None) else system + "\n\n" + m["content"]
            segs.append((" [INST] " + content + " [/INST]", C))
        else:
            segs.append((" " + m["content"] + o.eos, A))
    return segs


def _mistral_legacy(messages, gen, o: RenderOptions) -> Segments:
    """Mistral-7B-Instruct-v0.2 as released: BOS once, `[INST] q [/INST]a</s>`, no space before
    the answer, no strip, no system message (its Jinja raises on one), no generation prompt."""
    system, turns = split_system(messages)
    if system is not None:
        raise SFTError(f"{o.where}: template 'mistral-legacy' has no system message (its Jinja raises on "
                       "one); use 'mistral' or drop the system message")
    segs = [(o.bos, C)]
    for m in turns:
        if m["role"] == "user":
            segs.append(("[INST] " + m["content"] + " [/INST]", C))
        else:
            segs.append((m["content"] + o.eos, A))
    return segs


def _zephyr(messages, gen, o: RenderOptions) -> Segments:
    """zephyr-7b-beta / TinyLlama-Chat: `<|role|>\\ncontent</s>\\n`, no strip, no BOS in the text."""
    segs = []
    for m in messages:
        if m["role"] == "assistant":
            segs += [("<|assistant|>\n", C), (m["content"] + o.eos, A), ("\n", C)]
        else:
            segs.append(("<|" + m["role"] + "|>\n" + m["content"] + o.eos + "\n", C))
    if gen:
        segs.append(("<|assistant|>\n", C))
    return segs


def _vicuna(messages, gen, o: RenderOptions) -> Segments:
    """Vicuna v1.1 (lmsys tokenizer_config): default system prompt, ` USER: ` / ` ASSISTANT: `, no BOS."""
    system, turns = split_system(messages)
    segs = [(VICUNA_DEFAULT_SYSTEM if system is None else system, C)]
    for m in turns:
        if m["role"] == "user":
            segs.append((" USER: " + m["content"].strip(), C))
        else:
            segs += [(" ASSISTANT:", C), (" " + m["content"].strip() + o.eos, A)]
    if gen:
        segs.append((" ASSISTANT:", C))
    return segs


TEMPLATES = {"alpaca": _alpaca, "chatml": _chatml, "llama2": _llama2, "llama3": _llama3,
             "mistral": _mistral, "mistral-legacy": _mistral_legacy, "zephyr": _zephyr, "vicuna": _vicuna,
             **TOOL_FAMILIES}
# Llama-2 and Mistral templates have no generation prompt: their prompt already ends with [/INST].
STOP_STRINGS = {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"], **TOOL_FAMILY_STOPS}


def _check_template_can_write(name: str, messages: list[dict], tools: list[dict] | None,
                              enable_thinking: bool | None, date_string: str | None, where: str) -> None:
    """Refuse what a template would drop or ignore: tool data, reasoning, thinking/date switches."""
    lacking = tool_data_in(messages, tools)
    if lacking and name not in TOOL_FAMILIES:
        raise SFTError(f"{where}: template {name!r} has no tool syntax and would drop the {lacking}; "
                       f"use a template with tools ({', '.join(TOOL_FAMILIES)}) or remove the tool data")
    if enable_thinking is not None and name not in THINKING_FAMILIES:
        raise SFTError(f"{where}: template {name!r} has no thinking syntax, so enable_thinking does "
                       f"nothing; templates with thinking: {', '.join(THINKING_FAMILIES)}")
    if date_string is not None and name not in DATED_FAMILIES:
        raise SFTError(f"{where}: template {name!r} writes no date; date_string is for {', '.join(DATED_FAMILIES)}")


def _segments(name: str, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
              enable_thinking: bool | None, date_string: str | None, bos_token: str | None,
              eos_token: str | None, where: str) -> Segments:
    if name not in TEMPLATES:
        raise SFTError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    tools = tools_of(messages) if tools is None else tools
    validate_conversation(messages, where, tools)
    _check_template_can_write(name, messages, tools, enable_thinking, date_string, where)
    inline = name not in THINKING_FAMILIES and has_reasoning(messages)
    if inline:
        messages = _reasoning_into_text(messages)
    bos, eos = FAMILY_TOKENS[name]
    options = RenderOptions(name, where, bos if bos_token is None else bos_token, eos if eos_token is None else eos_token,
                            tools, enable_thinking, LLAMA_DEFAULT_DATE if date_string is None else date_string)
    segs = [(t, part) for t, part in TEMPLATES[name](messages, add_generation_prompt, options) if t]
    return _split_inline_reasoning(segs) if inline else segs


def _reasoning_into_text(messages: list[dict]) -> list[dict]:
    """Reasoning written where a template without thinking syntax can show it: a <think> block
    at the start of the answer, as DeepSeek-R1 writes it (and as the text was before a loader
    split it out). Dropping it silently would train a different model than the data says."""
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("reasoning"):
            m["content"] = THINK_OPEN + "\n" + m.pop("reasoning") + "\n" + THINK_CLOSE + "\n\n" + m["content"]
        m.pop("reasoning", None)
    return type(messages)(out, tools_of(messages)) if tools_of(messages) is not None else out


_INLINE_THINK = re.compile(re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE) + r"\n*", re.S)


def _split_inline_reasoning(segs: Segments) -> Segments:
    """Cut the <think> block of _reasoning_into_text out of each ANSWER segment as REASONING."""
    out: Segments = []
    for text, part in segs:
        m = _INLINE_THINK.search(text) if part == Part.ANSWER else None
        if m is None:
            out.append((text, part))
            continue
        out += [(t, p) for t, p in ((text[:m.start()], part), (m.group(), Part.REASONING),
                                    (text[m.end():], part)) if t]
    return out


def render(template_name: str, messages: list[dict], add_generation_prompt: bool = False, *,
           tools: list[dict] | None = None, enable_thinking: bool | None = None, date_string: str | None = None,
           bos_token: str | None = None, eos_token: str | None = None, where: str = "conversation") -> str:
    """The exact text the family's Jinja chat template produces (BOS/EOS strings included).

    tools: the function schemas (None: the conversation's own `tools`, see data.conversation).
    enable_thinking: qwen3 only; False puts an empty think block in the generation prompt.
    date_string: llama3.1/3.2 only; the "Today Date" line, by default the templates' own fixed
    fallback "26 Jul 2024", so that training data renders the same on any day (reproducible).
    bos_token/eos_token: the tokenizer's strings, where the Jinja writes bos_token/eos_token.
    where: names the conversation in error messages.
    """
    segs = _segments(template_name, messages, add_generation_prompt, tools, enable_thinking, date_string,
                     bos_token, eos_token, where)
    return "".join(t for t, _ in segs)


def render_segments(template_name: str, messages: list[dict], *, tools: list[dict] | None = None,
                    enable_thinking: bool | None = None, date_string: str | None = None,
                    bos_token: str | None = None, eos_token: str | None = None,
                    where: str = "conversation") -> Segments:
    """`render(...)` (no generation prompt) cut into (text, Part) pieces; see the module docstring."""
    return _segments(template_name, messages, False, tools, enable_thinking, date_string, bos_token, eos_token, where)


def stop_strings(name: str, eos_token: str | None = None) -> list[str]:
    """Every string that ends an assistant turn in this template (what generation must stop on).

    Llama-3.x: <|eot_id|> and <|eom_id|> (their tokenizer's eos <|end_of_text|> is the caller's
    to add, as for every template); Qwen: <|im_end|> and <|endoftext|>; templates that end turns
    with eos_token: that string (the tokenizer's when given).
    """
    if name not in TEMPLATES:
        raise SFTError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return STOP_STRINGS.get(name, [eos_token or FAMILY_TOKENS[name][1]])


# ---- mapping a checkpoint's Jinja template to one of ours ----

# Distinctive markup, used only to say which family an unknown template resembles.
FAMILY_MARKERS = [("Cutting Knowledge Date", "llama3.1/llama3.2"), ("<|start_header_id|>", "llama3"),
                  ("<think>", "qwen3"), ("<tool_call>", "qwen2.5"), ("<|im_start|>", "chatml"),
                  ("<<SYS>>", "llama2"), ("[INST]", "mistral"), ("<|assistant|>", "zephyr"),
                  ("ASSISTANT:", "vicuna"), ("### Instruction", "alpaca")]

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}
_TAG = re.compile(r"(\{\{|\{%|\{#)(-?)(.*?)(-?)(\}\}|%\}|#\})", re.S)


def _squeeze(code: str) -> str:
    """Drop whitespace outside string literals inside a Jinja tag (it never reaches the output)."""
    out, quote, i = [], None, 0
    while i < len(code):
        c = code[i]
        if quote:
            if c == "\\" and i + 1 < len(code):  # `\n` and a raw newline render alike: compare decoded
                out.append(_ESCAPES.get(code[i + 1], "\\" + code[i + 1]))
                i += 1
            else:
                out.append(c)
                quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
            out.append(c)
        elif not c.isspace():
            out.append(c)
        i += 1
    return "".join(out)


def normalize_jinja(source: str) -> str:
    """A canonical form of a chat template: equal forms render equal text under HF's Jinja settings.

    HF compiles templates with trim_blocks (drop the newline after a `%}`) and lstrip_blocks (drop
    spaces before a `{%` on its line); `-` strips whitespace on its side. Those rules, plus dropping
    whitespace inside tags outside string literals, make a one-line and an indented copy compare equal.
    """
    parts, pos = [], 0  # alternating raw text and (open, code, close) tags
    for m in _TAG.finditer(source):
        parts += [source[pos:m.start()], (m.group(1), m.group(2), m.group(3), m.group(4), m.group(5))]
        pos = m.end()
    parts.append(source[pos:])
    out = []
    for k in range(0, len(parts), 2):
        text = parts[k]
        prev, nxt = (parts[k - 1] if k else None), (parts[k + 1] if k + 1 < len(parts) else None)
        if prev and prev[3]:
            text = text.lstrip()
        elif prev and prev[4] == "%}" and text.startswith("\n"):
            text = text[1:]
        if nxt and nxt[1]:
            text = text.rstrip()
        elif nxt and nxt[0] == "{%":
            text = re.sub(r"(^|\n)[ \t]+$", r"\1", text)
        out.append(text)
        if nxt and nxt[0] != "{#":
            out.append(nxt[0] + _squeeze(nxt[2]) + nxt[4])
    return "".join(out).strip()


_KNOWN_NORMALIZED = {normalize_jinja(src): name for name, src in KNOWN_JINJA.items()}


def template_from_tokenizer_config(config: dict | str | Path, option: str = "data.template") -> str:
    """The name of our template whose Jinja source equals the checkpoint's `chat_template`.

    `config` is a tokenizer_config.json dict or a model folder. Raises SFTError when the folder has
    no chat template or its template is not one we reproduce byte for byte; the message says how
    to name one with `option`, the way the calling tool spells it (`data.template`, `--template`).
    """
    choose = f"{option}{'=' if '.' in option else ' '}NAME (one of {', '.join(TEMPLATES)})"
    source = "tokenizer_config.json"
    if not isinstance(config, dict):
        path = Path(config) / "tokenizer_config.json"
        source = str(path)
        if not path.is_file():
            raise SFTError(f"{path}: not found; choose a template with {choose}")
        config = read_json(path, "tokenizer_config.json")
    jinja = config.get("chat_template")
    if isinstance(jinja, list):  # newer HF layout: [{"name": "default", "template": ...}, ...]
        jinja = next((t.get("template") for t in jinja if t.get("name") == "default"), None)
    if not jinja:
        raise SFTError(f"{source}: has no chat_template (a base model?); choose a template with {choose}; "
                       "alpaca is a good choice for a base model")
    name = _KNOWN_NORMALIZED.get(normalize_jinja(jinja))
    if name:
        return name
    guess = next((fam for marker, fam in FAMILY_MARKERS if marker in jinja), None)
    hint = (f"it looks like the {guess} family but is not the {guess} template we reproduce byte for byte; "
            if guess else "")
    raise SFTError(f"{source}: unknown chat_template ({hint}we do not run Jinja); choose a template with "
                   f"{choose} after checking it renders the same text")
