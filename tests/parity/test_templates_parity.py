"""Our hand-written chat templates == the real Jinja templates, byte for byte.

Each fixture in tests/parity/templates/ is the `chat_template` of a real model of that family
(the first line, a Jinja comment, says where it was copied from). transformers renders it with
`render_jinja_template` -- the function behind `tokenizer.apply_chat_template(..., tokenize=False)`
-- and we compare with `data.templates.render` on multi-turn conversations with and without a
system message, with and without the generation prompt.
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
FAMILIES = ["alpaca", "chatml", "llama2", "llama3", "mistral", "zephyr", "vicuna"]


def fixture(name: str) -> str:
    text = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    assert text.startswith("{# source:"), f"{name}.jinja must start with its source comment"
    text = text[text.index("#}\n") + 3:]
    if name == "alpaca":  # chujiezheng's files are pretty-printed; their README strips and joins lines
        text = "".join(line.strip() for line in text.splitlines())
    return text


def jinja(name: str, messages, add_generation_prompt=False, template=None) -> str:
    bos, eos = FAMILY_TOKENS[name]
    out, _ = render_jinja_template(conversations=[messages], chat_template=template or fixture(name),
                                   add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
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
                                   bos_token="<BOS>", eos_token="<EOS>")
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
                                               add_generation_prompt=gen, bos_token=bos, eos_token=eos)
        assert out == render(name, messages, add_generation_prompt=gen)


def test_tiny_llama2_tokenizer_config_maps_to_llama2_and_apply_chat_template_agrees(tiny_llama2_dir):
    assert template_from_tokenizer_config(tiny_llama2_dir) == "llama2"
    tok = _load_hf_tokenizer(str(tiny_llama2_dir))
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages, tokenize=False) == render("llama2", messages)


def test_mistral_v01_template_rejects_a_system_message_and_is_not_mapped():
    v01 = fixture("mistral_v0.1")
    with pytest.raises(Exception, match="roles"):
        jinja("mistral", [SYSTEM] + TURNS[:2], template=v01)
    assert jinja("mistral", TURNS[:2], template=v01) != render("mistral", TURNS[:2])
    with pytest.raises(SFTError, match="mistral family"):
        template_from_tokenizer_config({"chat_template": v01})
