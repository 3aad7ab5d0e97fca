"""Our hand-written chat templates == the real Jinja templates, byte for byte.

Each fixture in tests/parity/templates/ is the `chat_template` of a real model of that family
(the first line, a Jinja comment, says where it was copied from; llama3.1, llama3.2, qwen2.5 and
qwen3 come from the llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/models/templates/). transformers
renders it with `render_jinja_template` -- the function behind
`tokenizer.apply_chat_template(..., tokenize=False)` -- and we compare with `data.templates.render`
on multi-turn conversations with and without a system message, with and without the generation
prompt; for the four tool families also on tool conversations (tools only, call -> result ->
answer, consecutive results, a call with a generation prompt, several calls in a turn) and, for
Qwen3, on every thinking variant (reasoning on the last / earlier turns, `<think>` inside the
content, enable_thinking False/True/None).
"""
import functools
from pathlib import Path

import pytest

pytest.importorskip("jinja2")
transformers = pytest.importorskip("transformers")
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

from data.templates import FAMILY_TOKENS, KNOWN_JINJA, render, template_from_tokenizer_config  # noqa: E402
from model.errors import SFTError  # noqa: E402

FIXTURES = Path(__file__).parent / "templates"
TOOL_FAMILIES = ["llama3.1", "llama3.2", "qwen2.5", "qwen3"]
FAMILIES = ["alpaca", "chatml", "llama2", "llama3", "mistral", "zephyr", "vicuna"] + TOOL_FAMILIES


def fixture(name: str) -> str:
    text = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    assert text.startswith("{# source:"), f"{name}.jinja must start with its source comment"
    text = text[text.index("#}\n") + 3:]
    if name == "alpaca":  # chujiezheng's files are pretty-printed; their README strips and joins lines
        text = "".join(line.strip() for line in text.splitlines())
    return text


def to_hf(messages) -> list[dict]:
    """Our messages in the layout HF templates read: calls wrapped in "function", reasoning_content."""
    out = []
    for m in messages:
        h = {k: v for k, v in m.items() if k not in ("tool_calls", "reasoning")}
        if m.get("tool_calls"):
            h["tool_calls"] = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                               for c in m["tool_calls"]]
        if m.get("reasoning") is not None:
            h["reasoning_content"] = m["reasoning"]
        out.append(h)
    return out


def jinja_kwargs(name: str, kw: dict) -> dict:
    """Our render() keywords as template variables (None = not passed, as render() means it)."""
    kw = {k: v for k, v in kw.items() if v is not None}
    if name == "llama3.2":  # its Jinja would print today's date (strftime_now); our default is the fixed one
        kw.setdefault("date_string", "26 Jul 2024")
    return kw


def jinja(name: str, messages, add_generation_prompt=False, template=None, **kw) -> str:
    bos, eos = FAMILY_TOKENS[name]
    out, _ = render_jinja_template(conversations=[to_hf(messages)], chat_template=template or fixture(name),
                                   add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos,
                                   **jinja_kwargs(name, kw))
    return out[0]


SYSTEM = {"role": "system", "content": "You are a terse assistant.\nAnswer in one line. "}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "  And times three?\n\nShow the steps.  "},
    {"role": "assistant", "content": "\n(2+2)*3 = 12\n"},
    {"role": "user", "content": "Say 'café' — in “quotes” 🙂"},
    {"role": "assistant", "content": "“café” 🙂"},
]
CONVERSATIONS = [TURNS[:2], TURNS[:4], TURNS, [SYSTEM] + TURNS[:2], [SYSTEM] + TURNS,
                 [{"role": "system", "content": ""}] + TURNS[:2]]
PROMPTS = [TURNS[:1], TURNS[:3], [SYSTEM] + TURNS[:1], [SYSTEM] + TURNS[:5]]


@pytest.mark.parametrize("name", FAMILIES)
def test_render_matches_real_jinja_template_byte_for_byte(name):
    cases = [(c, False) for c in CONVERSATIONS] + [(p, True) for p in PROMPTS]
    for messages, gen in cases:
        expected = jinja(name, messages, gen)
        assert render(name, messages, add_generation_prompt=gen) == expected, (name, messages, gen)


@pytest.mark.parametrize("name", FAMILIES)
def test_bos_and_eos_come_from_the_tokenizer_like_in_jinja(name):
    messages = [SYSTEM] + TURNS[:4]
    out, _ = render_jinja_template(conversations=[messages], chat_template=fixture(name),
                                   bos_token="<BOS>", eos_token="<EOS>", **jinja_kwargs(name, {}))
    assert render(name, messages, bos_token="<BOS>", eos_token="<EOS>") == out[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_fixture_is_the_jinja_source_we_map_from_tokenizer_config(name):
    assert template_from_tokenizer_config({"chat_template": fixture(name)}) == name
    assert template_from_tokenizer_config({"chat_template": KNOWN_JINJA[name]}) == name


@functools.lru_cache(maxsize=1)
def _load_hf_tokenizer(path: str):
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture
def hf_tokenizer(tiny_llama2_dir):
    return _load_hf_tokenizer(str(tiny_llama2_dir))


@pytest.mark.parametrize("name", FAMILIES)
def test_apply_chat_template_with_each_fixture_agrees(hf_tokenizer, name):
    """The public entry point, tokenizer.apply_chat_template(chat_template=...), on every case."""
    bos, eos = FAMILY_TOKENS[name]
    cases = [(c, False) for c in CONVERSATIONS] + [(p, True) for p in PROMPTS]
    for messages, gen in cases:
        out = hf_tokenizer.apply_chat_template(messages, chat_template=fixture(name), tokenize=False,
                                               add_generation_prompt=gen, bos_token=bos, eos_token=eos,
                                               **jinja_kwargs(name, {}))
        assert out == render(name, messages, add_generation_prompt=gen)


def test_tiny_llama2_tokenizer_config_maps_to_llama2_and_apply_chat_template_agrees(tiny_llama2_dir):
    assert template_from_tokenizer_config(tiny_llama2_dir) == "llama2"
    tok = _load_hf_tokenizer(str(tiny_llama2_dir))
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages, tokenize=False) == render("llama2", messages)


def test_mistral_legacy_matches_the_released_v02_jinja_and_refuses_a_system_message_like_it():
    for messages in [TURNS[:2], TURNS[:4], TURNS]:
        assert render("mistral-legacy", messages) == jinja("mistral-legacy", messages)
    for messages in [TURNS[:1], TURNS[:3]]:
        assert render("mistral-legacy", messages, add_generation_prompt=True) == jinja("mistral-legacy", messages, True)
    assert template_from_tokenizer_config({"chat_template": fixture("mistral-legacy")}) == "mistral-legacy"
    with pytest.raises(Exception, match="roles must alternate|Only user and assistant roles"):
        jinja("mistral-legacy", [SYSTEM] + TURNS[:2])
    with pytest.raises(SFTError, match="'mistral-legacy' has no system message"):
        render("mistral-legacy", [SYSTEM] + TURNS[:2])


def test_mistral_v01_template_rejects_a_system_message_and_is_not_mapped():
    v01 = fixture("mistral_v0.1")
    with pytest.raises(Exception, match="roles"):
        jinja("mistral", [SYSTEM] + TURNS[:2], template=v01)
    assert jinja("mistral", TURNS[:2], template=v01) != render("mistral", TURNS[:2])
    with pytest.raises(SFTError, match="mistral family"):
        template_from_tokenizer_config({"chat_template": v01})


# ---- tools and thinking (llama3.1, llama3.2, qwen2.5, qwen3) ----

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (°C).",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
CONVERT = {"name": "convert", "description": "Convert an amount between currencies",  # Glaive's flat layout
           "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"}}}}
TOOLS = [WEATHER, CONVERT]
ASK = {"role": "user", "content": "Weather in Zürich and São Paulo? "}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Zürich"}}]}
CALLS = {"role": "assistant", "content": "", "tool_calls": [
    {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}},
    {"name": "get_weather", "arguments": {"city": "São Paulo"}}]}
TEXT_AND_CALLS = dict(CALLS, content="Let me check both.")
RESULT = {"role": "tool", "name": "get_weather", "content": '{"temp": 21, "sky": "clear"}'}
RESULT2 = {"role": "tool", "name": "get_weather", "content": "28 C, rain\n"}
ANSWER = {"role": "assistant", "content": "Zürich: 21 °C, clear. São Paulo: 28 °C, rain."}
NEXT = [{"role": "user", "content": "And in Oslo, in euros: convert 10 USD."},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "convert", "arguments": {"amount": 10, "to": "EUR"}}]},
        {"role": "tool", "content": "9.2"}, {"role": "assistant", "content": "10 USD is 9.20 EUR."}]
TOOL_SYSTEM = {"role": "system", "content": "You are a weather bot. "}

# (messages, add_generation_prompt, tools): every one with and without a system message
_LLAMA_TOOL_CASES = [([ASK], True), ([ASK, ANSWER], False), ([ASK, CALL], False), ([ASK, CALL, RESULT], True),
                     ([ASK, CALL, RESULT, ANSWER], False), ([ASK, CALL, RESULT, RESULT2, ANSWER], False),
                     ([ASK, CALL, RESULT, ANSWER] + NEXT, False), ([ASK, CALL, RESULT, ANSWER] + NEXT[:3], True)]
_QWEN_TOOL_CASES = _LLAMA_TOOL_CASES + [([ASK, CALLS, RESULT, RESULT2, ANSWER], False), ([ASK, CALLS], True),
                                        ([ASK, TEXT_AND_CALLS, RESULT, RESULT2], True),
                                        ([ASK, TEXT_AND_CALLS, RESULT, RESULT2, ANSWER] + NEXT, False)]


def tool_cases(name: str):
    cases = _QWEN_TOOL_CASES if name.startswith("qwen") else _LLAMA_TOOL_CASES
    for messages, gen in cases:
        for system in ([], [TOOL_SYSTEM]):
            yield system + messages, gen, TOOLS
    yield [TOOL_SYSTEM, ASK, ANSWER], False, [CONVERT]
    yield [ASK, ANSWER], True, []  # an empty tool list: Llama writes its tool preamble, Qwen nothing


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_tool_conversations_render_like_the_released_jinja(name):
    n = 0
    for messages, gen, tools in tool_cases(name):
        assert render(name, messages, gen, tools=tools) == jinja(name, messages, gen, tools=tools), (messages, gen)
        n += 1
    assert n >= 18


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_tools_carried_by_the_conversation_render_like_tools_passed_in(name):
    from data.conversation import Conversation
    conv = Conversation([ASK, CALL, RESULT, ANSWER], tools=TOOLS)
    assert render(name, conv) == jinja(name, list(conv), tools=TOOLS)
    assert render(name, conv[:3], True) == jinja(name, list(conv[:3]), True, tools=TOOLS)


@pytest.mark.parametrize("name", ["llama3.1", "llama3.2"])
def test_llama_date_string_fills_the_today_line(name):
    for messages, gen, tools in [([SYSTEM] + TURNS[:2], False, None), ([ASK, CALL], False, TOOLS)]:
        ours = render(name, messages, gen, tools=tools, date_string="02 Jan 2026")
        assert "Today Date: 02 Jan 2026\n" in ours
        assert ours == jinja(name, messages, gen, tools=tools, date_string="02 Jan 2026")


Q = [{"role": "user", "content": "What is 17 * 23?"}, {"role": "user", "content": "Now add 9."}]
R1 = {"role": "assistant", "content": "391", "reasoning": "17*23 = 17*20 + 17*3 = 340 + 51.\n"}
R2 = {"role": "assistant", "content": "\n\n400", "reasoning": "\n391 + 9 = 400"}
IN_CONTENT = {"role": "assistant", "content": "<think>\nadd 9\n</think>\n\n400"}
EMPTY_REASONING = {"role": "assistant", "content": "400", "reasoning": ""}
PLAIN = {"role": "assistant", "content": "400"}
WRAPPED = {"role": "user", "content": "<tool_response>\n{\"temp\": 21}\n</tool_response>"}
THINK_CALL = dict(CALL, reasoning="I need the weather tool.")
THINKING_CASES = [
    ([Q[0], R1], False), ([SYSTEM, Q[0], R1, Q[1], R2], False), ([Q[0], R1, Q[1]], True),
    ([Q[0], R1, Q[1], IN_CONTENT], False), ([Q[0], IN_CONTENT, Q[1], PLAIN], False),
    ([Q[0], R1, Q[1], EMPTY_REASONING], False), ([Q[0], PLAIN, Q[1], PLAIN], False),
    ([Q[0], R1, WRAPPED, R2], False), ([Q[0], R1, WRAPPED], True),
    ([ASK, THINK_CALL, RESULT, R2], False), ([ASK, CALL, RESULT, R2], False), ([ASK, THINK_CALL, RESULT, PLAIN], False),
    ([ASK, THINK_CALL, RESULT], True), ([ASK, THINK_CALL, RESULT, R2, Q[1], R1], False),
]


def test_qwen3_thinking_renders_like_the_released_jinja():
    """Reasoning kept after the last user query and stripped before it, from `reasoning` or <think>."""
    n = 0
    for messages, gen in THINKING_CASES:
        for enable_thinking in (None, True, False):
            tools = TOOLS if any(m.get("tool_calls") for m in messages) else None
            ours = render("qwen3", messages, gen, tools=tools, enable_thinking=enable_thinking)
            assert ours == jinja("qwen3", messages, gen, tools=tools, enable_thinking=enable_thinking), (messages, gen)
            n += 1
    assert n == 42
    assert render("qwen3", [Q[0]], True, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("name, folder", [("llama3.2", "tiny-random-llama3"), ("qwen2.5", "tiny-random-qwen2"),
                                          ("qwen3", "tiny-random-qwen3")])
def test_tiny_folders_carry_these_templates_and_apply_chat_template_agrees(shared_file, name, folder):
    import json
    path = shared_file(f"models/{folder}")
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == fixture(name)
    assert template_from_tokenizer_config(path) == name
    tok = _load_hf_tokenizer(str(path))
    for messages, gen, tools in list(tool_cases(name)) + [(c, False, None) for c in CONVERSATIONS]:
        out = tok.apply_chat_template(to_hf(messages), tools=tools, tokenize=False, add_generation_prompt=gen,
                                      **jinja_kwargs(name, {}))
        assert out == render(name, messages, gen, tools=tools)


def test_llama31_and_llama33_share_one_jinja_and_tiny_llama3_uses_the_32_one():
    assert "Llama-3.3-70B-Instruct (the two files are identical)" in (FIXTURES / "llama3.1.jinja").read_text()
    assert KNOWN_JINJA["llama3.1"] != KNOWN_JINJA["llama3.2"]
    assert template_from_tokenizer_config({"chat_template": fixture("llama3.1")}) == "llama3.1"
