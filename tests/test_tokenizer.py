"""Specs for model/tokenizer.py: SentencePiece plus the special tokens of an HF folder."""
import shutil

import pytest

from model import Tokenizer
from model.errors import SFTError


@pytest.fixture
def llama2(tiny_llama2_dir):
    return Tokenizer.from_pretrained(tiny_llama2_dir)


def test_llama2_tokenizer_matches_known_ids_and_attributes(llama2):
    assert llama2.encode("Hello world") == [15043, 3186]
    assert llama2.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert (llama2.bos_id, llama2.eos_id, llama2.unk_id, llama2.pad_id) == (1, 2, 0, None)
    assert (llama2.bos_token, llama2.eos_token, llama2.vocab_size) == ("<s>", "</s>", 32000)
    assert llama2.chat_template.startswith("{% if messages[0]['role'] == 'system' %}")
    assert llama2.token_to_id("▁Hello") == 15043 and llama2.token_to_id("no-such-piece") is None


def test_pico_tokenizer_has_no_chat_template(pico_dir):
    tok = Tokenizer.from_pretrained(pico_dir)
    assert tok.chat_template is None and tok.vocab_size == 4096
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"


def test_special_token_strings_in_text_become_single_ids_without_a_dummy_prefix(llama2):
    # ids checked against transformers 5.24 LlamaTokenizer on the same folder
    text = "<s>[INST] Hi there [/INST] Hello! </s>"
    assert llama2.encode(text) == [1, 29961, 25580, 29962, 6324, 727, 518, 29914, 25580, 29962,
                                   15043, 29991, 29871, 2]
    assert llama2.encode("a</s>b") == [263, 2, 29890]
    assert llama2.encode("</s> after") == [2, 1156]


def test_text_that_starts_with_a_space_gets_no_extra_dummy_prefix(llama2):
    assert llama2.encode(" leading") == [8236]


def test_decode_writes_special_tokens_unless_skipped(llama2):
    ids = llama2.encode("<s>Hello</s>")
    assert llama2.decode(ids) == "<s>Hello</s>"
    assert llama2.decode(ids, skip_special_tokens=True) == "Hello"
    for text in ["</s> after", "a</s>b", "<s>[INST] Hi [/INST] Hello! </s>", "Hello world"]:
        assert llama2.decode(llama2.encode(text)) == text


def test_added_special_tokens_split_text_and_survive_save_and_load(llama2, tmp_path):
    assert llama2.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>"]) == 2
    assert llama2.vocab_size == 32002
    ids = llama2.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 32000 and ids[-1] == 32001 and len(ids) < 10
    assert llama2.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    llama2.save(tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    assert back.vocab_size == 32002 and back.encode("<|im_start|>user\nHi<|im_end|>") == ids
    assert back.chat_template == llama2.chat_template


def test_missing_tokenizer_model_names_the_file(tiny_llama2_dir, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(tiny_llama2_dir, folder, ignore=shutil.ignore_patterns("*.safetensors*", "tokenizer.model"))
    with pytest.raises(SFTError, match=r"t/tokenizer.model: missing"):
        Tokenizer.from_pretrained(folder)


def test_unknown_special_token_in_config_names_the_key(tiny_llama2_dir, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(tiny_llama2_dir, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    cfg = (folder / "tokenizer_config.json").read_text().replace('"pad_token": null', '"pad_token": "<pad>"')
    (folder / "tokenizer_config.json").write_text(cfg)
    with pytest.raises(SFTError, match="pad_token.*'<pad>'"):
        Tokenizer.from_pretrained(folder)
