"""data.masking on tool and reasoning conversations: which tokens train, and Qwen3's one sample per query.

A character tokenizer (one token per character) makes the trained-token set readable: the trained
runs decode to exactly the strings listed. The real-tokenizer check uses pico-base's SentencePiece.
"""
import pytest

from data.conversation import Conversation
from data.masking import (IGNORE_INDEX, assistant_turns, sample_segments, tokenize_conversation,
                          tokenize_conversation_samples, tokenize_dataset)
from data.templates import render
from model.errors import SFTError

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
ASK = {"role": "user", "content": "Weather in Paris?"}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
THINK_CALL = dict(CALL, reasoning="Use the tool.")
RESULT = {"role": "tool", "content": '{"temp": 21}'}
ANSWER = {"role": "assistant", "content": "It is 21 C."}
Q1, A1 = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning": "Add."}
Q2, A2 = {"role": "user", "content": "Times 3?"}, {"role": "assistant", "content": "12", "reasoning": "4*3."}
TOOL_CONV = Conversation([ASK, CALL, RESULT, ANSWER], tools=[TOOL])
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


class CharTokenizer:
    """One token per character (ids are code points), so trained tokens read as text."""
    bos_token = eos_token = None

    def encode(self, text, bos=False, eos=False):
        return [ord(c) for c in text]


def trained_texts(sample: dict) -> list[str]:
    """The maximal runs of trained tokens, as text."""
    runs, cur = [], ""
    for i, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            cur += chr(i)
        elif cur:
            runs, cur = runs + [cur], ""
    return runs + ([cur] if cur else [])


def text_of(sample: dict) -> str:
    return "".join(chr(i) for i in sample["input_ids"])


@pytest.mark.parametrize("template, expected", [
    ("llama3.1", ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 21 C.<|eot_id|>"]),
    ("qwen2.5", [QWEN_CALL, "It is 21 C.<|im_end|>"]),
])
def test_tool_calls_and_answers_train_and_tool_results_and_tool_list_do_not(template, expected):
    s = tokenize_conversation(CharTokenizer(), template, TOOL_CONV)
    assert text_of(s) == render(template, TOOL_CONV)
    assert trained_texts(s) == expected


def test_qwen3_trains_a_tool_call_without_reasoning_in_its_own_sample():
    """Qwen3 writes the empty think block only on the last message: the call is generated with it."""
    first, second = tokenize_conversation_samples(CharTokenizer(), "qwen3", TOOL_CONV)
    assert text_of(first) == render("qwen3", TOOL_CONV[:2])
    assert trained_texts(first) == ["<think>\n\n</think>\n\n" + QWEN_CALL]
    assert text_of(second) == render("qwen3", TOOL_CONV)
    assert trained_texts(second) == ["<think>\n\n</think>\n\nIt is 21 C.<|im_end|>"]  # the call is context here


def test_qwen3_tool_episode_with_reasoning_is_one_sample_training_every_step():
    conv = Conversation([ASK, THINK_CALL, RESULT, A2], tools=[TOOL])
    [s] = tokenize_conversation_samples(CharTokenizer(), "qwen3", conv)
    assert trained_texts(s) == ["<think>\nUse the tool.\n</think>\n\n" + QWEN_CALL, "<think>\n4*3.\n</think>\n\n12<|im_end|>"]
    no_reasoning = tokenize_conversation(CharTokenizer(), "qwen3", conv, train_on_reasoning=False)
    assert no_reasoning["input_ids"] == s["input_ids"]
    assert trained_texts(no_reasoning) == [QWEN_CALL, "12<|im_end|>"]


def test_train_on_reasoning_false_keeps_thinking_as_context():
    tok = CharTokenizer()
    assert trained_texts(tokenize_conversation(tok, "qwen3", [Q1, A1])) == ["<think>\nAdd.\n</think>\n\n4<|im_end|>"]
    s = tokenize_conversation(tok, "qwen3", [Q1, A1], train_on_reasoning=False)
    assert "<think>\nAdd.\n</think>" in text_of(s) and trained_texts(s) == ["4<|im_end|>"]
    everything = tokenize_conversation(tok, "qwen3", [Q1, A1], strategy="train_on_all", train_on_reasoning=False)
    assert "".join(trained_texts(everything)) == text_of(everything).replace("<think>\nAdd.\n</think>\n\n", "")


def test_qwen3_multi_turn_trains_each_reply_in_the_text_it_was_generated_in():
    """History is rewritten (earlier thinking stripped): one sample per user query."""
    tok, conv = CharTokenizer(), [Q1, A1, Q2, A2]
    first, second = tokenize_conversation_samples(tok, "qwen3", conv)
    assert text_of(first) == render("qwen3", conv[:2])
    assert trained_texts(first) == ["<think>\nAdd.\n</think>\n\n4<|im_end|>"]
    assert text_of(second) == render("qwen3", conv) and "<|im_start|>assistant\n4<|im_end|>" in text_of(second)
    assert trained_texts(second) == ["<think>\n4*3.\n</think>\n\n12<|im_end|>"]
    with pytest.raises(SFTError, match="chat.jsonl line 3: template 'qwen3' rewrites earlier turns, so this "
                                       "conversation trains as 2 samples; use tokenize_conversation_samples"):
        tokenize_conversation(tok, "qwen3", conv, where="chat.jsonl line 3")
    samples, report = tokenize_dataset(tok, "qwen3", [conv, [Q1, A1]])
    assert samples == [first, second, first] and (report.conversations, report.samples, report.kept) == (2, 3, 3)
    assert report.summary().startswith("2 conversations -> 3 samples; kept 3 samples")
    # the last reply alone, or every token: one sample each
    [last] = tokenize_conversation_samples(tok, "qwen3", conv, strategy="train_on_last")
    assert last == second
    assert tokenize_conversation(tok, "qwen3", conv, strategy="train_on_all")["labels"] == second["input_ids"]


PLAIN = [TOOL_CONV, Conversation([ASK, CALL, RESULT, RESULT, ANSWER, Q1, ANSWER, Q2, ANSWER], tools=[TOOL]),
         [{"role": "system", "content": "Be brief."}, Q1, ANSWER, Q2, ANSWER, Q1]]
THINKING = [Conversation([ASK, THINK_CALL, RESULT, RESULT, A2, Q1, A1, Q2, ANSWER], tools=[TOOL]),
            [Q1, A1, Q2, A2, Q1, {"role": "assistant", "content": "<think>\nagain\n</think>\n\n4"}]]


@pytest.mark.parametrize("template", ["llama3.1", "llama3.2", "qwen2.5", "qwen3"])
def test_every_assistant_turn_trains_once_in_the_context_of_its_generation_prompt(template):
    """For each trained turn: text before it == render(history, add_generation_prompt=True), and the
    trained text is what follows that prompt when the turn is the last message."""
    for conv in PLAIN + (THINKING if template == "qwen3" else []):
        trained_turns = []
        for sample in sample_segments(template, conv):
            for run in assistant_turns([(t, p) for t, p, _ in sample]):
                if not any(sample[k][2] for k in run):
                    continue
                prompt = "".join(t for t, _, _ in sample[:run[0]])
                k = next(i for i, m in enumerate(conv) if m["role"] == "assistant"
                         and render(template, conv[:i], True) == prompt)
                written = "".join(t for t, _, flag in sample[run[0]:run[-1] + 1] if flag)
                assert render(template, conv[:k + 1]).startswith(prompt + written)
                trained_turns.append(k)
        assert sorted(trained_turns) == [i for i, m in enumerate(conv) if m["role"] == "assistant"]


def test_tool_data_with_a_template_without_tools_is_an_error_naming_the_sample():
    with pytest.raises(SFTError, match="chat.json sample 0: template 'alpaca' has no tool syntax"):
        tokenize_dataset(CharTokenizer(), "alpaca", [TOOL_CONV], source="chat.json")


@pytest.mark.parametrize("template", ["llama3.1", "llama3.2", "qwen2.5", "qwen3"])
def test_tool_and_reasoning_conversations_tokenize_with_a_real_sentencepiece_tokenizer(pico_dir, template):
    from model.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(pico_dir)
    convs = [TOOL_CONV, [Q1, ANSWER, Q2, ANSWER]] + ([[Q1, A1, Q2, A2]] if template == "qwen3" else [])
    samples, report = tokenize_dataset(tok, template, convs)
    assert not report.dropped_boundary and report.kept == report.samples >= len(convs)
    assert all(any(l != IGNORE_INDEX for l in s["labels"]) for s in samples)
