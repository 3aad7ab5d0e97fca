"""Specs for model/bpe.py (+ model/unicode_regex.py): byte-level BPE from tokenizer.json.

Expected ids were taken once from the `tokenizers` library 0.23.3 on the same files;
tests/parity/test_tokenizer_parity.py compares every shared text against it live.
"""
import functools
import json
import unicodedata

import pytest

from model import Tokenizer
from model.bpe import bytes_to_unicode
from model.errors import SFTError
from model.unicode_regex import translate

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
ROUND_TRIP = ["Hello world", "  leading and trailing  ", "\t\ttabs\r\nCRLF\r\n", "1 22 333 4444 1234567890",
              "I'M You'Re HE'LL", "👩‍👩‍👧‍👦 👍🏽", "naïve café", "مرحبا بالعالم", "你好，世界", "   ", "", "a\n\n\n b"]


@functools.cache
def loaded(folder) -> Tokenizer:
    """One load per folder for the whole file (a 9-11 MB tokenizer.json takes about a second);
    tests that change a tokenizer load their own."""
    return Tokenizer.from_pretrained(folder)


@pytest.fixture
def llama3(shared_file):
    return loaded(shared_file("models/tiny-random-llama3"))


@pytest.fixture
def qwen2(shared_file):
    return loaded(shared_file("models/tiny-random-qwen2"))


def tiny_spec(**model) -> dict:
    """A byte-level tokenizer.json small enough to reason about: id = byte value for the 256 byte
    characters, then "ab" 256 (merge "a b") and "abc" 257 (no merge builds it), GPT-2 splitting."""
    vocab = {c: b for b, c in bytes_to_unicode().items()} | {"ab": 256, "abc": 257}
    return {"version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"], "ignore_merges": False, **model}}


def load(tmp_path, spec: dict, name: str = "t") -> Tokenizer:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return Tokenizer.from_pretrained(folder)


def test_llama3_ids_match_the_tokenizers_library(llama3):
    assert llama3.encode("Hello world") == [9906, 1917]
    assert llama3.encode("I'M 12345 don't") == [40, 28703, 220, 4513, 1774, 1541, 956]
    assert llama3.encode("naïve café 你好 👍") == [3458, 38672, 588, 53050, 118195, 53901, 62904, 235]
    assert llama3.encode("Hi", bos=True) == [128000, 13347]


def test_qwen2_ids_match_the_tokenizers_library_and_normalize_to_nfc(qwen2):
    assert qwen2.encode("Hello world") == [9707, 1879]
    assert qwen2.encode("I'M 12345 don't") == [40, 27603, 220, 16, 17, 18, 19, 20, 1513, 944]  # digits one by one
    assert qwen2.encode("naïve café 你好 👍") == [3376, 37572, 586, 51950, 220, 108386, 61804, 235]
    assert qwen2.encode("cafe\u0301") == qwen2.encode("café") == [924, 58858]  # e + combining acute = é


def test_ignore_merges_takes_a_word_in_the_vocabulary_as_one_token(llama3, qwen2, tmp_path):
    # Llama-3 sets ignore_merges: " jeho" is token 101503, though its merges lead to " j" "eh" "o"
    assert llama3.encode(" jeho") == [101503]
    assert qwen2.encode(" jeho") == [502, 2636, 78]  # Qwen does not: merges only
    assert load(tmp_path, tiny_spec(ignore_merges=True), "on").encode("abc") == [257]
    assert load(tmp_path, tiny_spec(ignore_merges=False), "off").encode("abc") == [256, ord("c")]


def test_decode_inverts_encode(llama3, qwen2):
    for text in ROUND_TRIP + ["e\u0301 vs é"]:
        assert llama3.decode(llama3.encode(text)) == text
        assert qwen2.decode(qwen2.encode(text)) == unicodedata.normalize("NFC", text)


def test_special_token_strings_in_text_become_single_ids(llama3, qwen2):
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    assert llama3.encode(text) == [128006, 882, 128007, 271, 13347, 0, 128009]
    assert llama3.decode(llama3.encode(text)) == text
    assert llama3.decode(llama3.encode(text), skip_special_tokens=True) == "user\n\nHi!"
    assert qwen2.encode("<|im_start|>user\nHi!<|im_end|>\n") == [151644, 872, 198, 13048, 0, 151645, 198]
    # Llama-3's specials are ordinary punctuation to Qwen, and the other way round
    assert len(qwen2.encode("<|eot_id|>")) > 1 and len(llama3.encode("<|im_end|>")) > 1
    # <tool_call> is an added token that is not special: kept by skip_special_tokens
    assert qwen2.decode(qwen2.encode("<tool_call>x<|im_end|>"), skip_special_tokens=True) == "<tool_call>x"


def test_llama3_names_eot_as_eos_and_adds_bos_only_when_asked(llama3):
    assert (llama3.bos_token, llama3.bos_id, llama3.eos_token, llama3.eos_id) == \
        ("<|begin_of_text|>", 128000, "<|eot_id|>", 128009)
    assert (llama3.pad_id, llama3.unk_id, llama3.vocab_size) == (None, None, 128256)
    assert llama3.add_bos and not llama3.add_eos  # the TemplateProcessing post-processor's choice ...
    assert llama3.encode("Hi") == [13347]  # ... which encode leaves to the caller
    assert llama3.encode("Hi", bos=llama3.add_bos, eos=True) == [128000, 13347, 128009]
    assert llama3.chat_template.startswith("{{- bos_token }}")


def test_qwen_has_no_bos_and_bos_true_prepends_nothing(qwen2):
    assert (qwen2.bos_token, qwen2.bos_id, qwen2.add_bos) == (None, None, False)
    assert (qwen2.eos_id, qwen2.pad_id, qwen2.vocab_size) == (151645, 151643, 151665)
    assert qwen2.encode("Hi", bos=True, eos=True) == [13048, 151645]


def test_added_tokens_honour_lstrip_rstrip_single_word_and_normalized(tmp_path):
    spec = tiny_spec()
    spec["normalizer"] = {"type": "NFC"}
    spec["added_tokens"] = [
        {"id": 300, "content": "<L>", "lstrip": True, "rstrip": False, "single_word": False, "normalized": False, "special": True},
        {"id": 301, "content": "<R>", "lstrip": False, "rstrip": True, "single_word": False, "normalized": False, "special": True},
        {"id": 302, "content": "<W>", "lstrip": False, "rstrip": False, "single_word": True, "normalized": False, "special": True},
        {"id": 303, "content": "né", "lstrip": False, "rstrip": False, "single_word": False, "normalized": True, "special": False}]
    tok = load(tmp_path, spec)
    x, y, space = ord("x"), ord("y"), ord(" ")  # " " is byte 32, stored as "Ġ"
    assert tok.encode("x  <L>y") == [x, 300, y]  # lstrip swallows the spaces on its left
    assert tok.encode("x  <R>  y") == [x, space, space, 301, y]  # rstrip only those on its right
    assert tok.encode("a <W> b") == [ord("a"), space, 302, space, ord("b")]
    assert 302 not in tok.encode("a<W>b")  # single_word: not inside a word
    assert tok.encode("ne\u0301") == [303]  # normalized: matched after NFC


def test_merges_read_the_same_as_strings_or_pairs(tmp_path):
    strings = load(tmp_path, tiny_spec(merges=["a b"]), "strings")
    pairs = load(tmp_path, tiny_spec(merges=[["a", "b"]]), "pairs")
    assert strings.encode("abab ab") == pairs.encode("abab ab") == [256, 256, ord(" "), 256]


@pytest.mark.parametrize("key, value, message", [
    ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": r"\s+"},
                       "behavior": "Isolated", "invert": False}, {"type": "Metaspace"}]},
     r"tokenizer.json: pre_tokenizer.pretokenizers\[1\].type 'Metaspace' is not supported \(supported: "),
    ("model", {"type": "WordPiece", "vocab": {}}, r"tokenizer.json: model.type 'WordPiece' is not supported"),
    ("normalizer", {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]},
     r"tokenizer.json: normalizer.normalizers\[1\].type 'Lowercase' is not supported"),
    ("decoder", {"type": "Metaspace"}, r"tokenizer.json: decoder.type 'Metaspace' is not supported"),
    ("post_processor", {"type": "RobertaProcessing"}, r"tokenizer.json: post_processor.type 'RobertaProcessing'"),
    ("pre_tokenizer", {"type": "Split", "pattern": {"Regex": r"\p{Han}+"}, "behavior": "Isolated", "invert": False},
     r"tokenizer.json: pre_tokenizer.pattern.Regex: '\\p\{Han\}' .*is not supported in the regex"),
    ("pre_tokenizer", {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "MergedWithNext", "invert": False},
     r"tokenizer.json: pre_tokenizer.behavior 'MergedWithNext' is not supported \(supported: Isolated\)"),
])
def test_unsupported_parts_are_one_line_errors_naming_file_and_key(tmp_path, key, value, message):
    spec = tiny_spec()
    spec[key] = value | ({"merges": []} if key == "model" else {})
    with pytest.raises(SFTError, match=message) as e:
        load(tmp_path, spec)
    assert "\n" not in str(e.value)


def test_split_regex_classes_are_unicode_categories_and_white_space():
    # Python's \s would take U+001C (a control character); Oniguruma's, White_Space, does not
    assert translate(r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+").findall("héllo٣ 你好\x1c!") == \
        ["héllo", "٣", " ", "你好", "\x1c!"]
    assert translate(LLAMA3_SPLIT).findall("I'M 12345 don't\n\n  x") == \
        ["I", "'M", " ", "123", "45", " don", "'t", "\n\n", " ", " x"]
    for bad in [r"\p{Han}", r"(?<name>a)", r"a++", r"\bx", r"[[:alpha:]]"]:
        with pytest.raises(SFTError, match="is not supported in the regex"):
            translate(bad, "tokenizer.json: pre_tokenizer.pattern.Regex")


def test_word_cache_is_bounded_and_does_not_change_ids(tmp_path, monkeypatch):
    monkeypatch.setattr("model.bpe.CACHE_WORDS", 3)
    tok = load(tmp_path, tiny_spec())
    text = "one two three four five six one two"
    first = tok.encode(text)
    assert len(tok.backend._cache) == 3 and tok.encode(text) == first == load(tmp_path, tiny_spec(), "u").encode(text)


def test_save_writes_the_same_tokenizer_json_and_reloads_with_the_same_ids(llama3, tmp_path):
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi! 12345<|eot_id|>"
    llama3.save(tmp_path / "same")
    assert (tmp_path / "same" / "tokenizer.json").read_bytes() == llama3.backend.raw
    back = Tokenizer.from_pretrained(tmp_path / "same")
    assert back.encode(text) == llama3.encode(text) and back.chat_template == llama3.chat_template
    assert (back.bos_id, back.eos_id, back.add_bos) == (llama3.bos_id, llama3.eos_id, llama3.add_bos)


def test_added_special_tokens_go_into_the_saved_tokenizer_json(shared_file, tmp_path):
    tok = Tokenizer.from_pretrained(shared_file("models/tiny-random-qwen2"))
    assert tok.add_special_tokens(["<|new|>", "<|im_end|>"]) == 1 and tok.vocab_size == 151666
    tok.save(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["added_tokens"][-1] == {"id": 151665, "content": "<|new|>", "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": False, "special": True}
    back = Tokenizer.from_pretrained(tmp_path)
    assert back.encode("<|im_start|>a<|new|>b") == [151644, 64, 151665, 65] and back.vocab_size == 151666
