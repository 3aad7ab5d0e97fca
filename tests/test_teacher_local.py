"""A local teacher answers in text; tool calls and thinking are read back out of it, so a local
model and an endpoint give the same structured Completion. The model is scripted (the shared
tiny-random-qwen3 has random weights): its `generate` returns the tokens of a chosen reply, and
everything around it is real -- the folder's tokenizer and chat template, the prompt with the tool
list, decoding, cutting at the stop string, parsing."""
import json
from types import SimpleNamespace

import pytest

from data.conversation import Conversation
from data.formats import load_conversations
from data.synth import AnswersOptions, answer_conversations
from data.teacher import Completion, Teacher, completion_from_message, completion_from_text

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL_REPLY = ('<think>\nNeed the weather.\n</think>\n\nLet me check.\n<tool_call>\n'
              '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


class ScriptedModel:
    """Stands in for a Transformer: `generate` answers each prompt with the tokens of the next
    scripted reply (and records the prompt it was given, decoded)."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.prompts = tokenizer, list(replies), []
        self.config = SimpleNamespace(max_position_embeddings=4096, eos_ids=[tokenizer.eos_id])
        self.training = False

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode

    def generate(self, prompts, max_new_tokens, **kw):
        self.prompts += [self.tokenizer.decode(p) for p in prompts]
        return [self.tokenizer.encode(self.replies.pop(0), bos=False) for _ in prompts]  # stop token not included


@pytest.fixture(scope="module")
def qwen3_tokenizer(shared_file):
    from model import Tokenizer
    folder = shared_file("models/tiny-random-qwen3")
    return folder, Tokenizer.from_pretrained(folder)


def local_teacher(qwen3_tokenizer, monkeypatch, replies) -> tuple[Teacher, ScriptedModel]:
    import model
    folder, tok = qwen3_tokenizer
    scripted = ScriptedModel(tok, replies)
    monkeypatch.setattr(model, "load_pretrained", lambda *a, **kw: scripted)
    monkeypatch.setattr(model.Tokenizer, "from_pretrained", staticmethod(lambda *a, **kw: tok))
    return Teacher(model_dir=str(folder)), scripted


def test_local_qwen3_reply_gives_the_same_completion_as_an_endpoint(qwen3_tokenizer, monkeypatch):
    teacher, scripted = local_teacher(qwen3_tokenizer, monkeypatch, [CALL_REPLY])
    ask = Conversation([{"role": "user", "content": "Weather in Paris?"}], [WEATHER])
    [local] = teacher.completions([ask])
    assert "<tools>" in scripted.prompts[0] and '"name": "get_weather"' in scripted.prompts[0]  # offered
    endpoint = completion_from_message({"content": "Let me check.", "reasoning_content": "Need the weather.",
                                        "tool_calls": [{"id": "call_0", "type": "function", "function": {
                                            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}, "url")
    assert local == endpoint == Completion("Let me check.", "Need the weather.",
                                           [{"id": "call_0", "name": "get_weather", "arguments": {"city": "Paris"}}])


def test_local_calls_are_read_only_when_tools_were_offered_and_a_botched_call_is_a_problem(qwen3_tokenizer, monkeypatch):
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {city}}\n</tool_call>'
    teacher, _ = local_teacher(qwen3_tokenizer, monkeypatch, [CALL_REPLY, bad])
    plain = [{"role": "user", "content": "Weather in Paris?"}]
    [text] = teacher.completions([plain])  # no tools offered: the reply is text (its thinking split off)
    assert text.tool_calls == [] and text.content.startswith("Let me check.\n<tool_call>") and text.reasoning
    [botched] = teacher.completions([Conversation(plain, [WEATHER])])
    assert botched.tool_calls == [] and "not valid JSON" in botched.problem


def test_llama_call_turn_is_the_call_alone():
    c = completion_from_text("llama3.1", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', True)
    assert c == Completion("", None, [{"id": "call_0", "name": "get_weather", "arguments": {"city": "Oslo"}}])
    assert completion_from_text("llama3.1", '{"name": "x"}', False).content == '{"name": "x"}'  # JSON as an answer


def test_local_tool_answers_round_trip_through_synth_and_load_conversations(qwen3_tokenizer, monkeypatch, tmp_path):
    teacher, _ = local_teacher(qwen3_tokenizer, monkeypatch, [CALL_REPLY])
    conv = Conversation([{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "?"}],
                        [WEATHER])
    out = tmp_path / "answers.jsonl"
    stats = answer_conversations(teacher, [conv], str(out), AnswersOptions())
    assert stats["accepted"] == 1 and stats["with_tool_calls"] == 1 and stats["with_reasoning"] == 1
    record = json.loads(out.read_text())
    assert record["messages"][-1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    [back] = load_conversations(out)
    assert back.tools == [WEATHER] and back[-1]["tool_calls"][0]["arguments"] == {"city": "Paris"}
    assert back[-1]["content"] == "Let me check." and back[-1]["reasoning"] == "Need the weather."
