"""data.tool_templates: Llama-3.1/3.2, Qwen2.5 and Qwen3 text with tools and thinking, and parsing calls back.

The literal strings below were rendered once by transformers from the released Jinja templates
(tests/parity/ checks many more conversations against the Jinja itself when transformers is
installed); these keep the templates checked where it is not.
"""
from pathlib import Path

import pytest

from data.conversation import Conversation, Part, validate_conversation
from data.tool_templates import parse_tool_calls
from data.templates import (KNOWN_JINJA, TEMPLATES, render, render_segments, stop_strings,
                            template_from_tokenizer_config)
from model.errors import SFTError

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SYSTEM = {"role": "system", "content": "Be brief."}
ASK = {"role": "user", "content": "Weather in Paris?"}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
RESULT = {"role": "tool", "content": '{"temp": 21}'}
ANSWER = {"role": "assistant", "content": "It is 21 C."}
TOOL_CONV = Conversation([ASK, CALL, RESULT, ANSWER], tools=[TOOL])
CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
Q1, A1 = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning": "Add."}
Q2, A2 = {"role": "user", "content": "Times 3?"}, {"role": "assistant", "content": "12", "reasoning": "4*3."}
TOOL_FAMILIES = ["llama3.1", "llama3.2", "qwen2.5", "qwen3"]
TOOL_LESS = sorted(set(TEMPLATES) - set(TOOL_FAMILIES))

LLAMA_TOOLS_HEAD = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: "
    "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nGiven the "
    "following functions, please respond with a JSON for a function call with its proper arguments that best answers "
    'the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of argument name and '
    'its value}.Do not use variables.\n\n{\n    "type": "function",\n    "function": {\n        "name": "get_weather",'
    '\n        "description": "Weather in a city",\n        "parameters": {\n            "type": "object",\n       '
    '     "properties": {\n                "city": {\n                    "type": "string"\n                }\n   '
    '         },\n            "required": [\n                "city"\n            ]\n        }\n    }\n}\n\n')
QWEN_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    'signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "get_weather", '
    '"description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, '
    '"required": ["city"]}}}\n</tools>\n\nFor each function call, return a json object with function name and '
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n")
QWEN_TURNS = ('<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": '
              '"get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
              '<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n')


def test_llama31_and_llama32_render_like_the_released_jinja():
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    assert render("llama3.1", [SYSTEM] + CONV) == render("llama3.2", [SYSTEM] + CONV) == expected
    assert render("llama3.1", TOOL_CONV) == render("llama3.2", TOOL_CONV) == LLAMA_TOOLS_HEAD + (
        'Weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
        '"parameters": {"city": "Paris"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temp\\": 21}"'
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt is 21 C.<|eot_id|>")
    assert "Today Date: 01 Feb 2026\n" in render("llama3.1", CONV, date_string="01 Feb 2026")


def test_qwen25_renders_like_the_released_jinja_with_its_default_system_prompt():
    default = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert render("qwen2.5", CONV[:1], True) == default + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render("qwen2.5", [SYSTEM] + CONV) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                                  "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert render("qwen2.5", TOOL_CONV) == default + "\n\n" + QWEN_TOOLS + QWEN_TURNS + "It is 21 C.<|im_end|>\n"


def test_qwen3_keeps_thinking_after_the_last_query_and_strips_it_before():
    assert render("qwen3", [SYSTEM] + CONV) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                                "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n")
    assert render("qwen3", TOOL_CONV) == ("<|im_start|>system\n" + QWEN_TOOLS + QWEN_TURNS
                                          + "<think>\n\n</think>\n\nIt is 21 C.<|im_end|>\n")
    earlier = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nTimes 3?<|im_end|>\n"
    assert render("qwen3", [Q1, A1, Q2, A2]) == earlier + "<|im_start|>assistant\n<think>\n4*3.\n</think>\n\n12<|im_end|>\n"
    assert render("qwen3", [Q1, A1, Q2], True, enable_thinking=False) == earlier + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render("qwen3", [Q1, A1, Q2], True) == render("qwen3", [Q1, A1, Q2], True, enable_thinking=True) == (
        earlier + "<|im_start|>assistant\n")
    # <think> inside the content is parsed out, as the Jinja does
    in_content = {"role": "assistant", "content": "<think>\n4*3.\n</think>\n\n12"}
    assert render("qwen3", [Q1, A1, Q2, in_content]) == render("qwen3", [Q1, A1, Q2, A2])


def test_segments_say_what_each_piece_of_a_tool_conversation_is():
    segs = render_segments("qwen3", TOOL_CONV)
    model_written = [(t, p) for t, p in segs if p.written_by_model]
    assert model_written == [('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                              Part.TOOL_CALL),
                             ("<think>\n\n</think>\n\n", Part.REASONING), ("It is 21 C.<|im_end|>", Part.ANSWER)]
    assert [t for t, p in segs if p is Part.TOOL_RESULT] == ['{"temp": 21}']
    llama = render_segments("llama3.1", TOOL_CONV)
    assert [(t, p) for t, p in llama if p not in (Part.CONTEXT,)] == [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', Part.TOOL_CALL),
        ('"{\\"temp\\": 21}"', Part.TOOL_RESULT), ("It is 21 C.<|eot_id|>", Part.ANSWER)]


def test_stop_strings_list_every_end_of_turn_marker():
    assert stop_strings("llama3.1") == stop_strings("llama3.2") == ["<|eot_id|>", "<|eom_id|>"]
    assert stop_strings("qwen2.5") == stop_strings("qwen3") == ["<|im_end|>", "<|endoftext|>"]


@pytest.mark.parametrize("name", TOOL_LESS)
def test_templates_without_tool_syntax_refuse_tool_data_by_name(name):
    with pytest.raises(SFTError, match=f"template '{name}' has no tool syntax and would drop the tool list"):
        render(name, CONV, tools=[TOOL])
    with pytest.raises(SFTError, match="would drop the assistant tool calls; use a template with tools.*qwen3"):
        render(name, [ASK, CALL, RESULT], tools=[])
    assert render(name, CONV, tools=[]) == render(name, CONV)  # an empty tool list loses nothing


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"qwen3"}))
def test_templates_without_thinking_syntax_write_reasoning_as_a_think_block(name):
    inline = dict(A1, content="<think>\n" + A1["reasoning"] + "\n</think>\n\n" + A1["content"])
    del inline["reasoning"]
    assert render(name, [Q1, A1]) == render(name, [Q1, inline])  # what the text was before a split
    segs = render_segments(name, [Q1, A1])
    assert [t for t, p in segs if p == Part.REASONING] == ["<think>\n" + A1["reasoning"] + "\n</think>\n\n"]
    with pytest.raises(SFTError, match="no thinking syntax, so enable_thinking does nothing"):
        render(name, [Q1], True, enable_thinking=False)
    assert render(name, [Q1, dict(A1, reasoning="")]) == render(name, [Q1, {"role": "assistant", "content": "4"}])


def test_llama_refuses_what_its_jinja_would_raise_on_or_drop():
    two = dict(CALL, tool_calls=CALL["tool_calls"] * 2)
    with pytest.raises(SFTError, match="message 1 has 2 tool calls; template 'llama3.1' writes one call"):
        render("llama3.1", [ASK, two])
    with pytest.raises(SFTError, match="message 1 has text and a tool call.*drops the text"):
        render("llama3.2", [ASK, dict(CALL, content="Let me look.")])
    with pytest.raises(SFTError, match="date_string is for llama3.1, llama3.2"):
        render("qwen3", CONV, date_string="01 Feb 2026")


def test_conversations_with_tools_are_validated():
    with pytest.raises(SFTError, match="message 1 is a tool result with no preceding tool call"):
        validate_conversation([ASK, RESULT])
    with pytest.raises(SFTError, match="message 2 is a tool result with no preceding tool call"):
        validate_conversation([ASK, ANSWER, RESULT])  # a result needs a preceding call
    with pytest.raises(SFTError, match="message 2 has role 'user', expected 'tool'"):
        validate_conversation([ASK, CALL, Q1])  # a call is answered by its results first
    with pytest.raises(SFTError, match="message 0 \\(user\\) has 'tool_calls'"):
        validate_conversation([dict(ASK, tool_calls=CALL["tool_calls"])])
    with pytest.raises(SFTError, match=r"message 1 tool_calls\[0\]: a tool call is"):
        validate_conversation([ASK, dict(CALL, tool_calls=[{"name": "f", "arguments": '{"a": 1}'}])])
    with pytest.raises(SFTError, match="'tools' must be a list"):
        validate_conversation(Conversation(CONV, tools={"name": "f"}))
    validate_conversation([ASK, CALL, RESULT, RESULT, ANSWER, Q1, A1])


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_parse_tool_calls_reads_back_what_the_template_wrote(name):
    """The inverse of the template: the reply after the generation prompt parses into the same calls."""
    calls = [{"name": "get_weather", "arguments": {"city": "São Paulo", "days": [1, 2], "hourly": True}}]
    messages = Conversation([ASK, dict(CALL, tool_calls=calls)], tools=[TOOL])
    prompt, full = render(name, messages[:1], True), render(name, messages)
    reply = full[len(prompt):]
    assert full.startswith(prompt) and reply.rstrip("\n").endswith(stop_strings(name)[0])
    parsed = parse_tool_calls(name, reply)
    assert parsed.calls == calls and parsed.attempted and parsed.parseable and parsed.problem == ""
    text = parse_tool_calls(name, "It is sunny.")
    assert text.calls == [] and not text.attempted and not text.parseable


def test_parse_tool_calls_llama_accepts_arguments_and_python_tag_and_names_problems():
    p = parse_tool_calls("llama3.1", '<|python_tag|>{"name": "f", "arguments": "{\\"x\\": 1}"}<|eom_id|>')
    assert p.calls == [{"name": "f", "arguments": {"x": 1}}] and p.parseable
    broken = parse_tool_calls("llama3.2", '{"name": "f", "parameters": {"x": 1}')
    assert broken.attempted and not broken.parseable and "not valid JSON" in broken.problem
    nameless = parse_tool_calls("llama3.1", '{"parameters": {"x": 1}}')
    assert nameless.attempted and not nameless.parseable and "no string 'name'" in nameless.problem


def test_parse_tool_calls_qwen_reads_several_blocks_and_skips_thinking():
    text = ('<think>\nmaybe <tool_call>{"name": "no"}</tool_call>\n</think>\n\nChecking.\n<tool_call>\n{"name": "a", '
            '"arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"k": "v"}}\n</tool_call>')
    p = parse_tool_calls("qwen3", text)
    assert p.calls == [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": "v"}}] and p.parseable
    half = parse_tool_calls("qwen2.5", '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name"')
    assert half.calls == [{"name": "a", "arguments": {}}] and half.attempted and not half.parseable
    assert "not closed" in half.problem
    bad = parse_tool_calls("qwen2.5", "<tool_call>\n{name: a}\n</tool_call>")
    assert bad.calls == [] and not bad.parseable and "not valid JSON" in bad.problem
    with pytest.raises(SFTError, match="template 'chatml' has no tool-call syntax"):
        parse_tool_calls("chatml", "<tool_call>{}</tool_call>")


def test_known_jinja_is_the_fixture_source_and_maps_back_to_its_name():
    fixtures = Path(__file__).parent / "parity" / "templates"
    for name in TOOL_FAMILIES:
        text = (fixtures / f"{name}.jinja").read_text(encoding="utf-8")
        assert KNOWN_JINJA[name] == text[text.index("#}\n") + 3:]
        assert template_from_tokenizer_config({"chat_template": KNOWN_JINJA[name]}) == name


@pytest.mark.parametrize("folder, name", [("tiny-random-llama3", "llama3.2"), ("tiny-random-qwen2", "qwen2.5"),
                                          ("tiny-random-qwen3", "qwen3")])
def test_tiny_folders_map_to_their_template(shared_file, folder, name):
    assert template_from_tokenizer_config(shared_file(f"models/{folder}")) == name


def test_an_edited_family_template_is_refused_with_the_family_named():
    edited = KNOWN_JINJA["qwen3"].replace("<think>\\n\\n</think>", "<think></think>")
    with pytest.raises(SFTError, match="looks like the qwen3 family"):
        template_from_tokenizer_config({"chat_template": edited})
    with pytest.raises(SFTError, match="looks like the llama3.1/llama3.2 family"):
        template_from_tokenizer_config({"chat_template": KNOWN_JINJA["llama3.1"].replace("26 Jul", "27 Jul")})
