"""evaluation.toolcall: a scripted fake model whose every rate is known in advance."""
import json
import xml.etree.ElementTree as ET

import pytest

from data.conversation import Conversation
from data.formats import load_conversations
from evaluation.report import compare_rows, to_markdown, write_report
from evaluation.toolcall import ParsedCalls, evaluate_toolcalls, json_equal, score_replies, toolcall_prompts
from model.errors import SFTError

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
         for n in ("get_weather", "get_time")]
PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
UTC = {"name": "get_time", "arguments": {"tz": "UTC"}}


def conv(key, *calls, follow_up=None):
    """user `key` -> assistant calls -> one result per call -> text answer (-> user/assistant text)."""
    msgs = [{"role": "user", "content": key}, {"role": "assistant", "content": "", "tool_calls": list(calls)}]
    msgs += [{"role": "tool", "content": f"result of {key}"} for _ in calls]
    msgs += [{"role": "assistant", "content": "Here it is."}]
    if follow_up:
        msgs += [{"role": "user", "content": follow_up}, {"role": "assistant", "content": "You're welcome."}]
    return Conversation(msgs, TOOLS)


def reply_call(*calls):
    return "CALL " + json.dumps(list(calls))


CONVERSATIONS = [
    conv("u1", PARIS, follow_up="u2"),
    conv("u3", UTC),
    conv("u4", {"name": "get_weather", "arguments": {"city": "Rome"}}),
    conv("u5", {"name": "get_weather", "arguments": {"city": "Oslo"}}),
    conv("u6", {"name": "get_weather", "arguments": {"city": "Bern"}}),
    conv("u7", PARIS, UTC),
]
SCRIPT = {  # the last prompt message -> what the fake model says
    "u1": reply_call({"name": "get_weather", "arguments": {"days": 3.0, "city": "Paris"}}),  # right call
    "u2": reply_call({"name": "get_time", "arguments": {}}),                                 # call instead of text
    "u3": reply_call({"name": "get_weather", "arguments": {"tz": "UTC"}}),                  # wrong function
    "u4": reply_call({"name": "get_weather", "arguments": {"city": "Roma"}}),               # wrong arguments
    "u5": 'CALL [{"name": "get_weather", "arguments": {city: Oslo}}]',                       # unparseable
    "u6": "I cannot check the weather.",                                                     # no call
    "u7": reply_call(UTC, PARIS),                                                            # right, other order
}


def fake_parse(text: str) -> ParsedCalls:
    if not text.startswith("CALL "):
        return ParsedCalls([], attempted=False, parseable=False, problem="no call")
    try:
        return ParsedCalls(json.loads(text[5:]), attempted=True, parseable=True)
    except json.JSONDecodeError as e:
        return ParsedCalls([], attempted=True, parseable=False, problem=e.msg)


def fake_generate(prompts):
    fake_generate.calls += 1
    assert all(isinstance(p, Conversation) and p.tools == TOOLS for p in prompts)
    return [SCRIPT.get(p[-1]["content"], "Here it is.") for p in prompts]  # after a tool result: text


@pytest.fixture
def result():
    fake_generate.calls = 0
    res = evaluate_toolcalls(CONVERSATIONS, fake_generate, fake_parse)
    assert fake_generate.calls == 1  # one batched call
    return res


def test_each_rate_is_the_share_of_its_verdicts(result):
    m = result["metrics"]
    assert (m["n_call_turns"], m["n_text_turns"]) == (6, 7)
    assert (m["n_parsed"], m["n_right_name"], m["n_right_args"], m["n_no_call"]) == (4, 3, 2, 6)
    assert m["call_parse_rate"] == pytest.approx(4 / 6) and m["call_name_acc"] == pytest.approx(3 / 6)
    assert m["call_args_acc"] == pytest.approx(2 / 6) and m["text_no_call_rate"] == pytest.approx(6 / 7)
    verdicts = dict(result["tables"]["verdicts"]["rows"])
    assert verdicts == {"right call": 2, "wrong arguments": 1, "wrong function": 1, "unparseable": 1,
                        "no call": 1, "text": 6, "call instead of text": 1}
    by_reply = {r["reply"]: r["verdict"] for r in result["records"]}
    assert [by_reply[SCRIPT[k]] for k in ("u1", "u2", "u3", "u4", "u5", "u6", "u7")] == [
        "right call", "call instead of text", "wrong function", "wrong arguments", "unparseable", "no call",
        "right call"]


def test_per_function_counts_pair_parallel_calls_in_any_order(result):
    assert result["tables"]["per function"]["rows"] == [["get_time", 2, 1, 1], ["get_weather", 5, 3, 2]]


def test_prompts_are_the_conversation_before_each_assistant_turn():
    pairs = toolcall_prompts(CONVERSATIONS[:1])
    assert [len(p) for p, _ in pairs] == [1, 3, 5]
    assert [p[-1]["role"] for p, _ in pairs] == ["user", "tool", "user"]
    assert pairs[0][1]["tool_calls"] == [PARIS] and pairs[0][0].tools == TOOLS


def test_held_out_glaive_file_gives_a_prompt_per_assistant_turn(shared_file):
    pairs = toolcall_prompts(load_conversations(shared_file("data/llamafactory_glaive_toolcall_en_demo.json")))
    assert len(pairs) == 746 + 211 and sum(bool(ref.get("tool_calls")) for _, ref in pairs) == 211
    assert {p[-1]["role"] for p, _ in pairs} == {"user", "tool"}


@pytest.mark.parametrize("a, b, equal", [
    ({"a": 1, "b": [1, {"c": None}]}, {"b": [1.0, {"c": None}], "a": 1.0}, True),
    ({"a": True}, {"a": 1}, False),
    ({"a": [1, 2]}, {"a": [2, 1]}, False),
    ({"a": "3"}, {"a": 3}, False),
    ({"a": 1}, {"a": 1, "b": 2}, False),
])
def test_arguments_compare_as_json_values(a, b, equal):
    assert json_equal(a, b) is equal and json_equal(b, a) is equal


def test_limit_and_reply_count(result):
    limited = evaluate_toolcalls(CONVERSATIONS, fake_generate, fake_parse, limit=2)
    assert limited["metrics"]["n_call_turns"] + limited["metrics"]["n_text_turns"] == 2
    with pytest.raises(SFTError, match="1 replies for 13 tool-call prompts"):
        score_replies(toolcall_prompts(CONVERSATIONS), ["x"], fake_parse)


def test_result_renders_through_the_report(result, tmp_path):
    report = {"model": "fake", "tasks": {"toolcall": result}}
    md = to_markdown(report)
    assert "| toolcall.call_args_acc | 0.3333 |" in md and "## toolcall: per function" in md
    paths = write_report(report, tmp_path)
    assert json.loads(paths["json"].read_text())["tasks"]["toolcall"]["metrics"] == result["metrics"]
    labels = [t.text for t in ET.fromstring(paths["svg"].read_text()).iter("{http://www.w3.org/2000/svg}text")]
    assert "toolcall.text_no_call_rate" in labels and "toolcall.n_parsed" not in labels


def test_compare_judges_each_rate_by_its_own_turn_count():
    def run(call, text):
        return {"tasks": {"toolcall": {"metrics": {"call_args_acc": call, "text_no_call_rate": text,
                                                   "n_call_turns": 5000, "n_text_turns": 20}}}}
    rows = {r[0]: r[4] for r in compare_rows(run(0.30, 0.30), run(0.40, 0.40))}
    assert rows["toolcall.call_args_acc"] == "better"              # 0.1 on 5000 turns is real
    assert rows["toolcall.text_no_call_rate"] == "~ (noise)"      # 0.1 on 20 turns is not
