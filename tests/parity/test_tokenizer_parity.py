"""Our byte-level BPE (model/bpe.py) == the `tokenizers` library and transformers, id for id.

For the Llama-3, Qwen2 and Qwen3 tokenizers of ../shared/models: every text of the shared
datasets (each message of every OASST2 tree, in many languages and scripts; every ShareGPT turn;
the MT-Bench questions; GSM8K and Alpaca records) and a list of hard cases give the same ids as
`tokenizers.Tokenizer.encode(text, add_special_tokens=False)`, and decode(encode(x)) gives x back
(NFC(x) for Qwen, whose normalizer is NFC). Variants of the Llama-3 file cover what the shipped
files do not use (GPT-2 splitting with a prefix space, SmolLM2's Digits, lstrip/rstrip/
single_word/normalized added tokens, ignore_merges off), and transformers' AutoTokenizer agrees
on a sample and reloads what we save. Run with -s to see the counts compared.
"""
import functools
import json
import unicodedata

import pytest

tokenizers = pytest.importorskip("tokenizers")

from data.formats import read_records, record_texts  # noqa: E402
from model import Tokenizer  # noqa: E402

FOLDERS = ["tiny-random-llama3", "tiny-random-qwen2", "tiny-random-qwen3"]
DATA = ["oasst2_filtered_trees.jsonl", "fastchat_dummy_conversation.json", "mt_bench_question.jsonl",
        "gsm8k_train_alpaca_format.json", "llamafactory_alpaca_en_demo.json"]
HARD = ["", " ", "    ", "\t", "\n", "   \n\n  ", "  leading", "trailing   ", " both \t ", "a\tb\t\tc",
        "line\r\nline\r\n\r\n", "\r\r\n\n\r", *("1234567890"[:n] for n in range(1, 11)), "3.14159 and 1,000,000",
        "I'M", "You'Re", "HE'LL", "they'VE", "I'D", "it'S", "'s'S'ſ", "don't", "DON'T",
        "👩‍👩‍👧‍👦 family", "👍🏽👍", "🏳️‍🌈", "e\u0301 \u0065\u0301\u0301 n\u0303", "Å Å Å", "ﬁ ﬀ ½ ²",
        "مرحبا بالعالم", "שלום עולם", "你好，世界！", "こんにちは世界", "안녕하세요", "Привет, мир", "नमस्ते",
        "\u00a0nbsp\u3000ideographic\u2028sep\x1cfs\x85nel", "\u200bzero\u200dwidth", "\x00\x01\x7f",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n<think>\nx\n</think>", "<|eot_id|><|eot_id|>",
        "x<|im_end|>y <tool_call> {\"a\": 1} </tool_call>", "<|reserved_special_token_5|> <|endoftext|>",
        "```python\ndef f(x):\n    return x  # comment\n```", "a" * 3000, " " * 500 + "x", "ab" * 700]


@functools.cache
def ours(folder) -> Tokenizer:
    return Tokenizer.from_pretrained(folder)


@functools.cache
def theirs(folder):
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


@functools.cache
def shared_texts(data_dir) -> dict[str, list[str]]:
    return {name: [t for where, rec in read_records(data_dir / name) for t in record_texts(rec, where)]
            for name in DATA}


def reference(tok: Tokenizer, text: str) -> str:
    return unicodedata.normalize("NFC", text) if tok.backend.nfc else text


def differences(mine: Tokenizer, hf, texts: list[str], ids: list[list[int]] | None = None) -> list[str]:
    """The texts whose ids (ours, or `ids` when given) differ from the `tokenizers` library's."""
    ids = ids or [mine.encode(t) for t in texts]
    return [t for t, a, b in zip(texts, ids, hf.encode_batch(texts, add_special_tokens=False)) if a != b.ids]


@pytest.fixture
def data_dir(shared_file):
    shared_file("data/" + DATA[0])
    return shared_file("data")


@pytest.mark.parametrize("name", FOLDERS)
def test_ids_and_round_trip_equal_on_every_shared_text(shared_file, data_dir, name):
    """Every text for Llama-3 and Qwen2; every 4th for Qwen3, whose vocabulary, merges and
    pre-tokenizer are Qwen2's (the files differ in four added tokens)."""
    folder = shared_file(f"models/{name}")
    mine, hf = ours(folder), theirs(folder)
    step = 4 if name == "tiny-random-qwen3" else 1
    counts = {}
    for file, texts in shared_texts(data_dir).items():
        texts = texts[::step]
        ids = [mine.encode(t) for t in texts]
        bad = differences(mine, hf, texts, ids)
        assert not bad, f"{name} {file}: {len(bad)} of {len(texts)} texts differ, first {bad[0][:300]!r}"
        wrong = [t for t, i in zip(texts, ids) if mine.decode(i) != reference(mine, t)]
        assert not wrong, f"{name} {file}: decode(encode(x)) != x for {len(wrong)} texts, first {wrong[0][:300]!r}"
        counts[file] = len(texts)
    print(f"\n{name}: ids equal and round trip on {sum(counts.values())} texts {counts}")
    assert counts["oasst2_filtered_trees.jsonl"] * step >= 1552 and counts["gsm8k_train_alpaca_format.json"] * step >= 14946


@pytest.mark.parametrize("name", FOLDERS)
def test_hard_cases_equal_the_tokenizers_library(shared_file, name):
    folder = shared_file(f"models/{name}")
    mine, hf = ours(folder), theirs(folder)
    for text in HARD:
        assert mine.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)
        assert mine.decode(mine.encode(text)) == reference(mine, text), repr(text)
    print(f"\n{name}: {len(HARD)} hard cases equal")


def llama3_variant(spec: dict, variant: str) -> dict:
    """The Llama-3 tokenizer.json (parsed; changed in place) with the parts other vocabularies
    use instead of its own."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if variant == "smollm2_digits_nfc_merges_only":
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
        spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}]}
        spec["model"]["ignore_merges"] = False
    elif variant == "gpt2_prefix_space_added_token_flags":
        spec["pre_tokenizer"] = dict(byte_level, add_prefix_space=True)  # a prefix space per piece
        flags = {"<|eot_id|>": {"lstrip": True}, "<|start_header_id|>": {"rstrip": True},
                 "<|end_header_id|>": {"lstrip": True, "rstrip": True}}
        for tok in spec["added_tokens"]:
            tok.update(flags.get(tok["content"], {}))
        plain = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": False}
        spec["added_tokens"] += [dict(plain, id=128256, content="<w>", single_word=True),
                                 dict(plain, id=128257, content="Hello", normalized=True),
                                 dict(plain, id=128258, content="é", normalized=True)]
        spec["normalizer"] = {"type": "NFC"}
    return spec


@pytest.mark.parametrize("variant", ["smollm2_digits_nfc_merges_only", "gpt2_prefix_space_added_token_flags"])
def test_variants_of_the_llama3_file_equal_the_tokenizers_library(shared_file, data_dir, tmp_path, variant):
    raw = (shared_file("models/tiny-random-llama3") / "tokenizer.json").read_text(encoding="utf-8")
    spec = llama3_variant(json.loads(raw), variant)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    mine, hf = Tokenizer.from_pretrained(tmp_path), tokenizers.Tokenizer.from_str(json.dumps(spec))
    extra = ["a  <|eot_id|>  b", "<|start_header_id|>   user   <|end_header_id|>\n\n x", "x<w>y", "x <w> y",
             "<w>", "say Hello,Hello world", "cafe\u0301 café", " 12 345 6789", "  two  spaces  "]
    texts = HARD + extra + [t for texts in shared_texts(data_dir).values() for t in texts[::25]]
    bad = differences(mine, hf, texts)
    assert not bad, f"{variant}: {len(bad)} of {len(texts)} texts differ, first {bad[0][:300]!r}"
    print(f"\n{variant}: {len(texts)} texts equal")


@pytest.mark.parametrize("name", FOLDERS)
def test_transformers_autotokenizer_agrees_on_a_sample(shared_file, data_dir, name):
    transformers = pytest.importorskip("transformers")
    folder = shared_file(f"models/{name}")
    mine, hf = ours(folder), transformers.AutoTokenizer.from_pretrained(folder)
    sample = HARD + [t for texts in shared_texts(data_dir).values() for t in texts[::50]]
    for text in sample:
        assert mine.encode(text) == hf.encode(text, add_special_tokens=False), repr(text[:200])
        # add_special_tokens=True is our encode with the post-processor's choice
        assert mine.encode(text, bos=mine.add_bos, eos=mine.add_eos) == hf.encode(text), repr(text[:200])
    assert (mine.bos_id, mine.eos_id, mine.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    print(f"\n{name}: {len(sample)} texts equal to AutoTokenizer")


@pytest.mark.parametrize("name", ["tiny-random-llama3", "tiny-random-qwen2"])
def test_saved_folder_reloads_in_transformers_with_the_same_ids(shared_file, tmp_path, name):
    transformers = pytest.importorskip("transformers")
    mine = Tokenizer.from_pretrained(shared_file(f"models/{name}"))
    mine.add_special_tokens(["<|new_turn|>"])
    mine.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in HARD[-12:] + ["<|new_turn|>hello<|new_turn|>", "a <|new_turn|> b"]:
        assert mine.encode(text) == hf.encode(text, add_special_tokens=False), repr(text[:200])
    assert hf.convert_tokens_to_ids("<|new_turn|>") == mine.token_to_id("<|new_turn|>") == mine.vocab_size - 1
    assert (hf.chat_template, hf.eos_token, hf.bos_token) == (mine.chat_template, mine.eos_token, mine.bos_token)
