"""data.formats with tools and reasoning: four layouts become one conversation model, bad tool data one line."""
import json

import pytest

from data.conversation import Conversation
from data.formats import load_conversations
from data.conversation import validate_conversation
from data.formats_tools import split_think, tool_report
from model.errors import SFTError

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
HELLO = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
HELLO_SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}


def write(tmp_path, name, *records):
    path = tmp_path / name
    text = "\n".join(json.dumps(r) for r in records) if name.endswith(".jsonl") else json.dumps(list(records))
    path.write_text(text, encoding="utf-8")
    return path


def call(name, args, **extra):
    return {"type": "function", "function": {"name": name, "arguments": args}, **extra}


def openai_record(*messages, tools=(WEATHER,)):
    return {"tools": list(tools), "messages": [{"role": "user", "content": "Weather in Paris?"}, *messages]}


def answered(*calls):
    """An assistant turn with OpenAI tool calls, its results, and a final answer."""
    return [{"role": "assistant", "content": None, "tool_calls": list(calls)},
            *[{"role": "tool", "content": "18C"} for _ in calls], {"role": "assistant", "content": "18C."}]


# ---- the shared real files ----

def test_glaive_sharegpt_file_loads_with_exact_counts(shared_file):
    convs = load_conversations(shared_file("data/llamafactory_glaive_toolcall_en_demo.json"))
    rep = tool_report(convs)
    assert (len(convs), rep.call_turns, rep.tool_calls, rep.tool_results) == (300, 211, 211, 211)
    assert rep.with_tools == 191 and rep.reasoning == 0 and not rep.undeclared
    roles = [m["role"] for c in convs for m in c]
    assert roles.count("user") == 746 and roles.count("assistant") == 746 + 211
    assert all(isinstance(c, Conversation) for c in convs)
    first = convs[0]
    assert first[3] == {"role": "assistant", "content": "", "tool_calls": [
        {"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}]}
    assert first[4]["role"] == "tool" and json.loads(first[4]["content"])["recipes"][0]["name"].startswith("Chicken")
    # the tools field is a JSON string of bare schemas: parsed and wrapped in the OpenAI layout
    assert first.tools[0]["type"] == "function" and first.tools[0]["function"]["name"] == "search_recipes"
    assert convs[1].tools is None  # "tools": "[]"


def test_reasoning_tool_use_file_loads_with_exact_counts(shared_file):
    convs = load_conversations(shared_file("data/llamafactory_reason_tool_use_demo_50.jsonl"))
    rep = tool_report(convs)
    assert (len(convs), rep.reasoning, rep.tool_calls, rep.tool_results) == (50, 112, 68, 42)
    assert rep.call_turns == 53 and not rep.undeclared
    first = convs[0]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[2]["reasoning"].startswith("Okay, the user is asking for schools")
    assert first[2]["content"].startswith("I'm sorry, but the available tools")
    assert first.tools[0]["function"]["parameters"]["type"] == "dict"  # kept as given
    two_calls = convs[6][2]
    assert two_calls["content"] == "" and [c["name"] for c in two_calls["tool_calls"]] == [
        "configure_backup_automation", "initiate_recovery_process"]
    assert two_calls["tool_calls"][0]["arguments"]["data_integrity_check"] is True
    # a stray </think> in text that already has a reasoning part stays as it is (as Qwen3 renders it)
    assert convs[6][4]["content"].endswith("</think>") and convs[6][4]["reasoning"].startswith("The user has")


# ---- the layouts, one by one ----

def test_openai_tool_calls_with_string_and_object_arguments(tmp_path):
    path = write(tmp_path, "o.jsonl", openai_record(
        {"role": "assistant", "content": None, "reasoning_content": "Two cities.", "tool_calls": [
            call("get_weather", '{"city": "Paris"}', id="c1"), call("get_weather", {"city": "Rome"}, id="c2")]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": "24C"},
        {"role": "assistant", "content": "Paris 18C, Rome 24C."}))
    conv = load_conversations(path)[0]
    assert conv[1] == {"role": "assistant", "content": "", "reasoning": "Two cities.", "tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Paris"}, "id": "c1"},
        {"name": "get_weather", "arguments": {"city": "Rome"}, "id": "c2"}]}
    assert conv[2] == {"role": "tool", "content": "18C", "name": "get_weather", "tool_call_id": "c1"}
    assert conv.tools == [WEATHER] and conv[:2].tools == [WEATHER]  # a prompt cut from it still shows the tools


def test_llamafactory_sharegpt_parallel_calls_system_and_a_tools_list(tmp_path):
    bare = dict(WEATHER["function"])
    path = write(tmp_path, "s.json", {"system": "Be brief.", "tools": [bare], "conversations": [
        {"from": "human", "value": "Paris and Rome?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                      {"name": "get_weather", "arguments": '{"city": "Rome"}'}])},
        {"from": "observation", "value": "18C"}, {"from": "observation", "value": "24C"},
        {"from": "gpt", "value": "18C and 24C."}, {"from": "human", "value": "thanks"}]})
    conv = load_conversations(path)[0]
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert [c["arguments"]["city"] for c in conv[2]["tool_calls"]] == ["Paris", "Rome"]
    assert conv.tools == [WEATHER]


def test_typed_parts_give_reasoning_then_text_then_calls(tmp_path):
    path = write(tmp_path, "p.jsonl", {"tools": json.dumps([WEATHER]), "messages": [
        {"role": "user", "content": [{"type": "text", "value": "Paris?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Need weather."},
                                          {"type": "text", "value": "Checking."},
                                          {"type": "tool_call", "value": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": [{"type": "text", "value": "18C"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "text", "value": "18C."}]}]})
    conv = load_conversations(path)[0]
    assert conv[1] == {"role": "assistant", "content": "Checking.", "reasoning": "Need weather.",
                       "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert conv[2] == {"role": "tool", "content": "18C"} and conv[3]["content"] == "It is 18C."


@pytest.mark.parametrize("text, reasoning, answer", [
    ("<think>\nplan\n</think>\n\nanswer", "plan", "answer"),
    ("plan, the opening tag was in the prompt</think>\nanswer", "plan, the opening tag was in the prompt", "answer"),
    ("<think>\n\n</think>\n\nanswer", "", "answer"),                    # Qwen3 with thinking off
    ("\n<think>a\n\nb \n</think>\n answer\n", "a\n\nb ", " answer\n"),  # only newlines trimmed, as Qwen3
])
def test_think_blocks_split_like_qwen3(text, reasoning, answer):
    msg = split_think({"role": "assistant", "content": text}, "x")
    assert (msg["reasoning"], msg["content"]) == (reasoning, answer)


def test_think_split_applies_to_every_format_and_leaves_other_text_alone(tmp_path):
    path = write(tmp_path, "a.json", {"instruction": "2+2?", "output": "<think>add</think>4"})
    assert load_conversations(path)[0][1] == {"role": "assistant", "content": "4", "reasoning": "add"}
    unclosed = {"role": "assistant", "content": "a <think> that never closes"}
    assert split_think(unclosed, "x") is unclosed
    user = {"role": "user", "content": "<think>x</think>y"}
    assert split_think(user, "x") is user


@pytest.mark.parametrize("text", ["Sure. <think>plan</think>answer", "<think>a</think>b</think>c"])
def test_think_text_that_qwen3_would_drop_is_an_error(text):
    with pytest.raises(SFTError, match="one <think>...</think> block"):
        split_think({"role": "assistant", "content": text}, "f.jsonl:3: message 1")


# ---- order and warnings ----

def test_trailing_tool_results_are_dropped_like_unanswered_questions(tmp_path):
    path = write(tmp_path, "t.jsonl", openai_record(*answered(call("get_weather", "{}"))[:2]))
    conv = load_conversations(path)[0]
    assert [m["role"] for m in conv] == ["user", "assistant"] and conv[-1]["tool_calls"]


def test_prompts_may_end_on_a_tool_result_but_order_is_checked():
    validate_conversation([{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]},
                           {"role": "tool", "content": "r"}])
    with pytest.raises(SFTError, match="message 1 has role 'user', expected 'assistant'"):
        validate_conversation([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}])
    with pytest.raises(SFTError, match=r"message 0 .*arguments"):  # arguments must be a parsed dict
        validate_conversation([{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{}"}]}])


def test_calls_to_undeclared_functions_are_counted_not_refused(tmp_path):
    path = write(tmp_path, "u.jsonl",
                 openai_record(*answered(call("get_weather", "{}"), call("get_time", "{}"))),
                 openai_record(*answered(call("get_time", "{}")), tools=()),
                 HELLO)
    rep = tool_report(load_conversations(path))
    assert rep.undeclared == {"get_time": 2} and (rep.tool_calls, rep.with_tools) == (3, 1)
    assert "warning: 2 calls to functions not in the conversation's tools (get_time x2)" in rep.summary()


# ---- bad tool data: one line naming file, record and field ----

def tool_turn(*calls):
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


BAD = [  # name, bad record, words the message must hold (besides the file and record)
    ("arguments_not_json", openai_record(*answered(call("get_weather", "{city: Paris}"))),
     ["message 1 tool_calls[0]", "arguments of 'get_weather': not valid JSON"]),
    ("arguments_not_an_object", openai_record(*answered(call("get_weather", "[1, 2]"))),
     ["message 1 tool_calls[0]", "must be a JSON object", "list"]),
    ("call_without_a_name", openai_record(*answered({"type": "function", "function": {"arguments": "{}"}})),
     ["message 1 tool_calls[0]", "no 'name'"]),
    ("function_call_value_not_json", {"conversations": [{"from": "human", "value": "q"},
                                                        {"from": "function_call", "value": "get_weather(Paris)"}]},
     ["turn 1 (function_call) value", "not valid JSON"]),
    ("tool_result_without_a_call", openai_record({"role": "tool", "content": "18C"},
                                                 {"role": "assistant", "content": "a"}),
     ["message 1", "tool result with no preceding tool call"]),
    ("observation_without_a_call", {"conversations": [{"from": "human", "value": "q"},
                                                      {"from": "observation", "value": "r"},
                                                      {"from": "gpt", "value": "a"}]},
     ["message 1", "tool result with no preceding tool call"]),
    ("call_not_followed_by_results", openai_record(tool_turn(call("get_weather", "{}")),
                                                   {"role": "user", "content": "?"},
                                                   {"role": "assistant", "content": "a"}),
     ["message 2", "expected 'tool'"]),
    ("unknown_part_type", {"messages": [{"role": "user", "content": [{"type": "image", "value": "x.png"}]},
                                        {"role": "assistant", "content": "a"}]},
     ["message 0 content[0]", "unknown part type 'image'"]),
    ("part_call_without_a_name", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "tool_call", "value": '{"arguments": {}}'}]}]},
     ["message 1 content[0]", "no 'name'"]),
    ("parts_out_of_order", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "text", "value": "a"}, {"type": "reasoning", "value": "r"}]}]},
     ["message 1 content[1]", "out of order"]),
    ("reasoning_in_a_user_turn", {"messages": [{"role": "user", "content": [{"type": "reasoning", "value": "r"}]},
                                               {"role": "assistant", "content": "a"}]},
     ["message 0 content[0]", "only hold text parts"]),
    ("tools_an_object", dict(openai_record(*answered(call("get_weather", "{}"))), tools={"name": "get_weather"}),
     ["tools must be a list of function schemas", "dict"]),
    ("tools_a_list_of_strings", dict(HELLO, tools=["get_weather"]), ["tools must be a list", "non-objects"]),
    ("tools_string_not_json", dict(HELLO, tools="[{name: f}]"), ["tools: not valid JSON"]),
    ("tool_schema_without_a_name", dict(HELLO, tools=[{"type": "function", "function": {"parameters": {}}}]),
     ["tools[0]", "name"]),
    ("tool_call_id_of_no_call", openai_record(tool_turn(call("get_weather", "{}", id="c1")),
                                              {"role": "tool", "tool_call_id": "c9", "content": "r"},
                                              {"role": "assistant", "content": "a"}),
     ["message 2", "tool_call_id 'c9'", "['c1']"]),
    ("legacy_function_call", openai_record({"role": "assistant", "content": None,
                                            "function_call": {"name": "get_weather", "arguments": "{}"}}),
     ["message 1", "legacy 'function_call'"]),
]


@pytest.mark.parametrize("fname, where", [("data.jsonl", "data.jsonl:2"), ("data.json", "data.json record 1")])
@pytest.mark.parametrize("name, record, words", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_data_is_one_line_naming_file_record_and_field(tmp_path, fname, where, name, record, words):
    good = HELLO_SHAREGPT if "conversations" in record else HELLO  # the format is told from the first record
    path = write(tmp_path, fname, good, record)
    with pytest.raises(SFTError) as err:
        load_conversations(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / where) + ":")
    for w in words:
        assert w in msg, msg
