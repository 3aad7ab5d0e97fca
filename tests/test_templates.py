"""data.templates: conversations -> the exact text (and trainable spans) of each chat family."""
import pytest

from data.conversation import Part
from data.masking import assistant_turns
from data.templates import (KNOWN_JINJA, TEMPLATES, normalize_jinja, render, render_segments, stop_strings,
                            template_from_tokenizer_config)
from model.errors import SFTError

SYSTEM = {"role": "system", "content": "Be brief."}
NO_SYSTEM = {"mistral-legacy"}  # its Jinja raises on a system message, and so do we (tested below)


def with_system(name: str) -> list:
    return CONV if name in NO_SYSTEM else [SYSTEM] + CONV


CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]


def test_llama2_renders_like_the_model_readme_example():
    messages = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert render("llama2", messages) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s>"


def test_known_renderings_of_each_family():
    two = CONV[:2]
    assert render("alpaca", two, ) == "<s>### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
    assert render("chatml", two, ) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert render("llama3", two) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                     "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    assert render("mistral", [SYSTEM] + two) == "<s> [INST] Be brief.\n\nHi [/INST] Hello!</s>"
    assert render("zephyr", two, ) == "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
    assert render("vicuna", [SYSTEM] + two) == "Be brief. USER: Hi ASSISTANT: Hello!</s>"
    assert render("zephyr", CONV[:1], add_generation_prompt=True) == "<|user|>\nHi</s>\n<|assistant|>\n"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_segments_join_to_the_rendered_text(name):
    for messages in (CONV, with_system(name)):
        assert "".join(t for t, _ in render_segments(name, messages)) == render(name, messages)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_trainable_segments_are_the_assistant_replies_and_their_end_marker(name):
    trained = [t for t, part in render_segments(name, with_system(name)) if part is Part.ANSWER]
    end = stop_strings(name)[0]
    assert ["".join(t.split()) for t in trained] == [f"Hello!{end}", f"Seeyou.{end}"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_training_prompt_equals_the_inference_prompt(name):
    """The text before each assistant turn is what render(..., add_generation_prompt=True) gives."""
    for messages in (CONV, with_system(name)):
        segs = render_segments(name, messages)
        replies = [run[0] for run in assistant_turns(segs)]
        user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
        for k, u in zip(replies, user_turns):
            before = "".join(t for t, _ in segs[:k])
            assert before == render(name, messages[:u + 1], add_generation_prompt=True)


def test_bos_and_eos_strings_can_come_from_the_tokenizer():
    assert render("alpaca", CONV[:2], bos_token="<B>", eos_token="<E>") == "<B>### Instruction:\nHi\n\n### Response:\nHello!<E>\n\n"
    assert stop_strings("zephyr", eos_token="<E>") == ["<E>"] and stop_strings("chatml") == ["<|im_end|>"]


def test_invalid_conversations_and_names_are_refused():
    with pytest.raises(SFTError, match="message 1 has role 'user'"):
        render("chatml", [CONV[0], CONV[0]])
    with pytest.raises(SFTError, match="message 0 has role 'assistant'"):
        render("llama3", CONV[1:])
    with pytest.raises(SFTError, match="unknown chat template 'gpt9'"):
        render("gpt9", CONV)


def test_template_from_tokenizer_config_maps_known_templates(tiny_llama2_dir):
    assert template_from_tokenizer_config(tiny_llama2_dir) == "llama2"
    for name, source in KNOWN_JINJA.items():
        assert template_from_tokenizer_config({"chat_template": source}) == name
    # indentation and whitespace inside tags do not matter; the text a template writes does
    spaced = KNOWN_JINJA["llama3"].replace("{% for", "{%   for").replace("%}{% if loop.index0", "%}\n    {% if loop.index0")
    assert template_from_tokenizer_config({"chat_template": spaced}) == "llama3"
    assert normalize_jinja("{{ 'a\\n' }}") == normalize_jinja("{{'a\n'}}")
    assert normalize_jinja("{% if x %}\n  {{ y }}") != normalize_jinja("{% if x %}{{ y }}")  # spaces before {{ are output
    assert normalize_jinja("{{ ' [INST] ' }}") != normalize_jinja("{{ '[INST] ' }}")


def test_template_from_tokenizer_config_says_to_set_template_when_unknown(pico_dir):
    with pytest.raises(SFTError, match="no chat_template.*data.template=NAME"):
        template_from_tokenizer_config(pico_dir)
    with pytest.raises(SFTError, match="looks like the chatml family.*data.template=NAME"):
        template_from_tokenizer_config({"chat_template": "{{ '<|im_start|>' + messages[0]['content'] }}"})
    with pytest.raises(SFTError, match="unknown chat_template"):
        template_from_tokenizer_config({"chat_template": "{{ messages }}"})


def test_mistral_legacy_is_the_released_v02_text_without_a_system_message():
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q"}]
    assert render("mistral-legacy", conv, add_generation_prompt=True) == "<s>[INST] Hi [/INST]Yo</s>[INST] Q [/INST]"
    with pytest.raises(SFTError, match="'mistral-legacy' has no system message"):
        render("mistral-legacy", [{"role": "system", "content": "S"}] + conv)
