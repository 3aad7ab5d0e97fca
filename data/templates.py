"""Chat templates, written by hand: a conversation -> the exact text a model was trained on.

A chat model only behaves if it sees, byte for byte, the markup it was fine-tuned with:
`[INST] ... [/INST]` for Llama-2, `<|im_start|>role\\n...<|im_end|>` for ChatML, and so on. The
Hugging Face world stores that markup as a Jinja program in `tokenizer_config.json`
(`chat_template`). We do not run Jinja (no dependency, and Jinja cannot tell us which characters
belong to the answer). Instead each family is a small Python function that reproduces its Jinja
template exactly -- tests/parity/ renders both on the same conversations and compares bytes --
and that returns the text as *segments* `(text, trainable)`:

    [("<s>### Instruction:\\nHi\\n\\n### Response:\\n", False), ("Hello!</s>", True), ("\\n\\n", False)]

`render()` joins the segments; `render_segments()` hands them to data/masking.py, which turns
them into labels. The trainable segment of an assistant turn is its reply *plus the end-of-turn
marker* (`</s>`, `<|im_end|>`, `<|eot_id|>`): a model that never learns to emit it never stops.
Everything before it -- the role header a generation prompt would end with -- is context.
Invariant (tested): the text before an assistant's trainable segment equals
`render(messages_up_to_that_user_turn, add_generation_prompt=True)`, so training and inference
see the same prompt.

BOS/EOS strings are part of the text, exactly where the Jinja template writes `bos_token` /
`eos_token`; the tokenizer maps those strings to their special ids. Pass the tokenizer's own
`bos_token`/`eos_token` (data/masking.py does) so a template never writes a special-token string
the tokenizer does not know.

System messages: every family here accepts one (Llama-2 and Mistral fold it into the first user
turn, Vicuna and Alpaca put it first, the others give it its own header). The older
Mistral-7B-Instruct-v0.1 template rejects it ("Only user and assistant roles are supported!");
its text also differs from ours (`[INST]` without the leading space), so it is not mapped to
"mistral" (tests/parity/ shows both).

Conversations are validated the same way for every family (an optional leading system message,
then user/assistant alternating, starting with the user); some Jinja templates accept more
(Llama-3 and ChatML check nothing), none of ours writes text for an invalid conversation.
"""
from __future__ import annotations

import re
from pathlib import Path

from model.errors import SFTError
from model.files import read_json

Segments = list[tuple[str, bool]]

# The bos/eos strings each family's own tokenizer uses; only used where the Jinja template writes
# `bos_token`/`eos_token` (Llama-3 and ChatML hard-code their turn markers instead).
FAMILY_TOKENS = {
    "alpaca": ("<s>", "</s>"),
    "chatml": ("<s>", "<|im_end|>"),
    "llama2": ("<s>", "</s>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "zephyr": ("<s>", "</s>"),
    "vicuna": ("<s>", "</s>"),
}
VICUNA_DEFAULT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


# ---- one function per family; each mirrors the Jinja template named in its docstring ----

def _alpaca(messages, gen, bos, eos) -> Segments:
    """chujiezheng/chat_templates alpaca.jinja (lines stripped and joined)."""
    system, turns = _split_system(messages)
    segs = [(bos + ("" if system is None else system.strip() + "\n\n"), False)]
    for m in turns:
        if m["role"] == "user":
            segs.append(("### Instruction:\n" + m["content"].strip() + "\n\n", False))
        else:
            segs += [("### Response:\n", False), (m["content"].strip() + eos, True), ("\n\n", False)]
    if gen:
        segs.append(("### Response:\n", False))
    return segs


def _chatml(messages, gen, bos, eos) -> Segments:
    """OpenHermes-2.5 / ChatML: every message `<|im_start|>role\\ncontent<|im_end|>\\n`, no strip."""
    segs = []
    for m in messages:
        if m["role"] == "assistant":
            segs += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segs.append(("<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n", False))
    if gen:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


def _llama2(messages, gen, bos, eos) -> Segments:
    """Llama-2-chat: system inside the first user turn as `<<SYS>>\\n..\\n<</SYS>>\\n\\n`; no generation prompt."""
    system, turns = _split_system(messages)
    segs = []
    for i, m in enumerate(turns):
        content = m["content"]
        if i == 0 and system is not None:
            content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content
        if m["role"] == "user":
            segs.append((bos + "[INST] " + content.strip() + " [/INST]", False))
        else:
            segs.append((" " + content.strip() + " " + eos, True))
    return segs


def _llama3(messages, gen, bos, eos) -> Segments:
    """Meta-Llama-3-Instruct: header per message, content trimmed, `<|eot_id|>` ends every turn."""
    segs = [(bos, False)]
    for m in messages:
        header = "<|start_header_id|>" + m["role"] + "<|end_header_id|>\n\n"
        if m["role"] == "assistant":
            segs += [(header, False), (m["content"].strip() + "<|eot_id|>", True)]
        else:
            segs.append((header + m["content"].strip() + "<|eot_id|>", False))
    if gen:
        segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segs


def _mistral(messages, gen, bos, eos) -> Segments:
    """Mixtral-8x7B-Instruct-v0.1 / Mistral-7B-Instruct-v0.2: system joins the first user turn; no strip."""
    system, turns = _split_system(messages)
    segs = [(bos, False)]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = m["content"] if (i > 0 or system is None) else system + "\n\n" + m["content"]
            segs.append((" [INST] " + content + " [/INST]", False))
        else:
            segs.append((" " + m["content"] + eos, True))
    return segs


def _zephyr(messages, gen, bos, eos) -> Segments:
    """zephyr-7b-beta / TinyLlama-Chat: `<|role|>\\ncontent</s>\\n`, no strip, no BOS in the text."""
    segs = []
    for m in messages:
        if m["role"] == "assistant":
            segs += [("<|assistant|>\n", False), (m["content"] + eos, True), ("\n", False)]
        else:
            segs.append(("<|" + m["role"] + "|>\n" + m["content"] + eos + "\n", False))
    if gen:
        segs.append(("<|assistant|>\n", False))
    return segs


def _vicuna(messages, gen, bos, eos) -> Segments:
    """Vicuna v1.1 (lmsys tokenizer_config): default system prompt, ` USER: ` / ` ASSISTANT: `, no BOS."""
    system, turns = _split_system(messages)
    segs = [(VICUNA_DEFAULT_SYSTEM if system is None else system, False)]
    for m in turns:
        if m["role"] == "user":
            segs.append((" USER: " + m["content"].strip(), False))
        else:
            segs += [(" ASSISTANT:", False), (" " + m["content"].strip() + eos, True)]
    if gen:
        segs.append((" ASSISTANT:", False))
    return segs


TEMPLATES = {"alpaca": _alpaca, "chatml": _chatml, "llama2": _llama2, "llama3": _llama3,
             "mistral": _mistral, "zephyr": _zephyr, "vicuna": _vicuna}
# Llama-2 and Mistral templates have no generation prompt: their prompt already ends with [/INST].
STOP_STRINGS = {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"]}


def validate_messages(messages: list[dict], where: str = "conversation") -> None:
    """Raise SFTError unless: optional system first, then user/assistant alternating from user."""
    if not isinstance(messages, list) or not messages:
        raise SFTError(f"{where}: a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise SFTError(f"{where}: message {i} must be a dict with a string 'content'")
        offset = 1 if messages[0].get("role") == "system" else 0
        expected = "system" if i < offset else ("user" if (i - offset) % 2 == 0 else "assistant")
        if m.get("role") != expected:
            raise SFTError(f"{where}: message {i} has role {m.get('role')!r}, expected {expected!r} "
                           "(an optional system message, then user/assistant alternating, user first)")


def _segments(name: str, messages: list[dict], add_generation_prompt: bool,
              bos_token: str | None, eos_token: str | None) -> Segments:
    if name not in TEMPLATES:
        raise SFTError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    validate_messages(messages)
    bos, eos = FAMILY_TOKENS[name]
    segs = TEMPLATES[name](messages, add_generation_prompt,
                           bos if bos_token is None else bos_token, eos if eos_token is None else eos_token)
    return [(t, flag) for t, flag in segs if t]


def render(template_name: str, messages: list[dict], add_generation_prompt: bool = False,
           bos_token: str | None = None, eos_token: str | None = None) -> str:
    """The exact text the family's Jinja chat template produces (BOS/EOS strings included)."""
    return "".join(t for t, _ in _segments(template_name, messages, add_generation_prompt, bos_token, eos_token))


def render_segments(template_name: str, messages: list[dict], bos_token: str | None = None,
                    eos_token: str | None = None) -> Segments:
    """`render(...)` cut into (text, trainable) pieces; trainable = an assistant reply + its end marker."""
    return _segments(template_name, messages, False, bos_token, eos_token)


def stop_strings(name: str, eos_token: str | None = None) -> list[str]:
    """The strings that end an assistant turn in this template (what generation must stop on)."""
    if name not in TEMPLATES:
        raise SFTError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return STOP_STRINGS.get(name, [eos_token or FAMILY_TOKENS[name][1]])


# ---- mapping a checkpoint's Jinja template to one of ours ----

# The Jinja sources we reproduce (the same strings as the fixtures in tests/parity/templates/).
KNOWN_JINJA = {
    "alpaca": "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim + '\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}{{ bos_token + system_message }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] | trim + eos_token + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}",
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama2": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "mistral": "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n",
    "zephyr": "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
    "vicuna": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = 'A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 %}{{ system_message }}{% endif %}{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'].strip() }}{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'].strip() + eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}",
}
# Distinctive markup, used only to say which family an unknown template resembles.
FAMILY_MARKERS = [("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"), ("<<SYS>>", "llama2"),
                  ("[INST]", "mistral"), ("<|assistant|>", "zephyr"), ("ASSISTANT:", "vicuna"),
                  ("### Instruction", "alpaca")]

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


def template_from_tokenizer_config(config: dict | str | Path) -> str:
    """The name of our template whose Jinja source equals the checkpoint's `chat_template`.

    `config` is a tokenizer_config.json dict or a model folder. Raises SFTError when the folder has
    no chat template or its template is not one we reproduce byte for byte.
    """
    source = "tokenizer_config.json"
    if not isinstance(config, dict):
        path = Path(config) / "tokenizer_config.json"
        source = str(path)
        if not path.is_file():
            raise SFTError(f"{path}: not found; set template= in the config (one of {', '.join(TEMPLATES)})")
        config = read_json(path, "tokenizer_config.json")
    jinja = config.get("chat_template")
    if isinstance(jinja, list):  # newer HF layout: [{"name": "default", "template": ...}, ...]
        jinja = next((t.get("template") for t in jinja if t.get("name") == "default"), None)
    if not jinja:
        raise SFTError(f"{source}: has no chat_template (a base model?); set template= in the config "
                       f"to one of {', '.join(TEMPLATES)} (alpaca is a good choice for a base model)")
    name = _KNOWN_NORMALIZED.get(normalize_jinja(jinja))
    if name:
        return name
    guess = next((fam for marker, fam in FAMILY_MARKERS if marker in jinja), None)
    hint = (f"it looks like the {guess} family but is not the {guess} template we reproduce byte for byte; "
            if guess else "")
    raise SFTError(f"{source}: unknown chat_template ({hint}we do not run Jinja); set template= in the "
                   f"config to one of {', '.join(TEMPLATES)} after checking it renders the same text")
