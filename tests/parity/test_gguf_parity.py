"""Parity of model/gguf.py with llama.cpp itself (optional extra `parity`: gguf, llama-cpp-python).

* The `gguf` package (llama.cpp's own reader and reference quantizer) reads every file we write:
  its metadata values are ours, and every tensor is byte-equal to `gguf.quants.quantize` of the
  checkpoint tensor (after llama.cpp's Q/K row permutation for the llama architecture).
* llama.cpp's converter (`convert_hf_to_gguf.py` of the same sdist, if present; path in
  LLAMA_CPP_CONVERTER) writes byte-identical tensors and the same metadata, less documented keys.
* llama.cpp runs the files: it tokenizes like our SentencePiece tokenizer (pico-base) and like
  the `tokenizers` library (Llama-3, Qwen2 byte-level BPE), its logits are as close to our fp32
  logits as those of the converter's files, and it reads back the chat template we stored.

Run: /work/parity-venv/bin/python -m pytest tests/parity/test_gguf_parity.py -s
(-s prints the measured differences.)
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import quantize as reference_quantize  # noqa: E402

from model.gguf import export_gguf, gguf_name, permute_rope_rows, quantize_q4_0, quantize_q8_0, read_gguf  # noqa: E402
from model.safetensors import load_sharded  # noqa: E402

CONVERTER = Path(os.environ.get("LLAMA_CPP_CONVERTER",
                                "/work/scratch/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"))
FOLDERS = ["pico-base", "tiny-random-llama3", "tiny-random-qwen2", "tiny-random-qwen3", "tiny-random-mistral"]
PROMPT = "Once upon a time"
TEXTS = ["Hello world!", " two  spaces and\ttabs\n\nnew lines ", "Numbers: 1 12 123 1234 3.14159 2026-11-30",
         "ümlaut café naïve — “quotes” 日本語 🦙", "I've been 'told' he's there, 'RE you sure?",
         "<|im_start|>user\nHi there<|im_end|>\n", "<s>[INST] Hello [/INST] Hi </s>", "   leading spaces"]
# keys we write differently from the converter, on purpose: general.name (the folder name, not a
# prettified one), size_label (not written), key/value_length (written only when head_dim differs
# from hidden/heads), add_sep_token (not a Llama/Qwen notion), {arch}.vocab_size (written for all)
DIFFERENT_KEYS = {"general.name", "general.size_label", "llama.attention.key_length",
                  "llama.attention.value_length", "tokenizer.ggml.add_sep_token", "qwen2.vocab_size",
                  "qwen3.vocab_size"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return {"dir": tmp_path_factory.mktemp("gguf"), "files": {}}


@pytest.fixture
def export(shared_file, cache):
    """export(folder name, type) -> path of our GGUF file (made once per module)."""
    def get(name: str, ttype: str) -> Path:
        if (name, ttype) not in cache["files"]:
            out = cache["dir"] / f"{name}-{ttype}.gguf"
            cache["files"][name, ttype] = export_gguf(shared_file(f"models/{name}"), out, ttype,
                                                      template_jinja=alpaca() if name == "pico-base" else None).path
        return cache["files"][name, ttype]
    return get


@pytest.fixture
def converted(shared_file, cache):
    """converted(folder name, type) -> path of llama.cpp's converter output for the same folder."""
    if not CONVERTER.exists():
        pytest.skip(f"llama.cpp converter not found at {CONVERTER} (set LLAMA_CPP_CONVERTER)")

    def get(name: str, ttype: str) -> Path:
        if ("converter", name, ttype) not in cache["files"]:
            copy = cache["dir"] / f"src-{name}"  # the converter may write into the folder it reads
            if not copy.exists():
                shutil.copytree(shared_file(f"models/{name}"), copy)
            out = cache["dir"] / f"{name}-{ttype}-converter.gguf"
            subprocess.run([sys.executable, str(CONVERTER), str(copy), "--outfile", str(out), "--outtype", ttype],
                           check=True, capture_output=True)
            cache["files"]["converter", name, ttype] = out
        return cache["files"]["converter", name, ttype]
    return get


def alpaca() -> str:
    from data.templates import KNOWN_JINJA
    return KNOWN_JINJA["alpaca"]


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under llama.cpp's names, permuted as llama.cpp's llama graph wants."""
    cfg = json.loads((folder / "config.json").read_text())
    llama = cfg["architectures"][0] in ("LlamaForCausalLM", "MistralForCausalLM")
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    out = {}
    for hf_name, t in load_sharded(folder).items():
        name = gguf_name(hf_name)
        part = name.split(".")[2] if name.startswith("blk.") else None
        out[name] = permute_rope_rows(t, heads[part]) if llama and part in heads else t
    return out


# ----------------------------------------------------------------------------- the gguf package
# GGUFReader parses every string of a file into numpy arrays: ~24 s for a byte-level BPE vocab
# (400k tokens and merges), so it reads one BPE file; there our reader must agree with it on every
# value, and the other BPE files are read with ours.

GGML = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0}


def check_against_config(meta: dict, tensors, folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    arch = meta["general.architecture"]
    assert meta[f"{arch}.block_count"] == cfg["num_hidden_layers"]
    assert meta[f"{arch}.embedding_length"] == cfg["hidden_size"]
    assert len(meta["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert ("output.weight" in tensors) != cfg["tie_word_embeddings"]


def check_tensors(tensors: dict[str, tuple[str, bytes]], folder: Path) -> None:
    """name -> (type name, stored bytes) equals gguf.quants.quantize of the permuted source."""
    src = source_tensors(folder)
    for name, (ttype, data) in tensors.items():
        if name != "rope_freqs.weight":  # generated; compared with the converter's file below
            assert data == reference_quantize(src[name].float().numpy(), GGML[ttype]).tobytes(), (name, ttype)


@pytest.mark.parametrize("name,ttype", [("pico-base", t) for t in ("f32", "f16", "bf16", "q8_0", "q4_0")]
                         + [("tiny-random-mistral", "q4_0"), ("tiny-random-llama3", "q4_0")])
def test_gguf_reader_reads_back_our_metadata_and_tensors(name, ttype, export, shared_file):
    path = export(name, ttype)
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta == read_gguf(path).metadata
    tensors = {t.name: (t.tensor_type.name.lower(), np.asarray(t.data).tobytes()) for t in reader.tensors}
    check_against_config(meta, tensors, shared_file(f"models/{name}"))
    check_tensors(tensors, shared_file(f"models/{name}"))


@pytest.mark.parametrize("name", ["tiny-random-qwen2", "tiny-random-qwen3"])
def test_qwen_tensors_are_byte_equal_to_gguf_quants(name, export, shared_file):
    f = read_gguf(export(name, "q4_0"))
    tensors = {n: (t.type, bytes(t.data)) for n, t in f.tensors.items()}
    check_against_config(f.metadata, tensors, shared_file(f"models/{name}"))
    check_tensors(tensors, shared_file(f"models/{name}"))
    assert {"blk.0.attn_q.bias", "blk.0.attn_k_norm.weight"} & tensors.keys()  # q/k/v biases; q/k norms


def test_quantizers_match_gguf_quants_on_hard_blocks():
    """Ties between +m and -m (which one sets the Q4_0 scale), zero blocks, fp16-subnormal and huge
    scales, and values that land exactly on .5 after scaling."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    x[0] = 0.0
    x[1, 3], x[1, 7] = 2.0, -2.0
    x[2, 3], x[2, 7] = -2.0, 2.0
    x[3] *= 1e-6
    x[4] *= 1e4
    x[5] = torch.arange(-16, 16) * 0.5
    x[6] = (torch.arange(32) - 15.5) * (127 / 15.5) / 127 * 3
    x[7] = torch.arange(32) + 0.5  # Q8_0: with max 127 the step is 1 and every code is a tie
    x[7, 0] = 127.0
    x[8] = -x[7]
    x[9] = (torch.arange(32) - 16) * 0.5  # Q4_0: -8 sets d = 1, and x / d + 8.5 lands on n.5 and n
    for ours, qtype in ((quantize_q8_0, gguf.GGMLQuantizationType.Q8_0), (quantize_q4_0, gguf.GGMLQuantizationType.Q4_0)):
        want = reference_quantize(x.numpy(), qtype).reshape(512, -1)
        assert np.array_equal(ours(x).numpy(), want), qtype.name


# ----------------------------------------------------------------------------- llama.cpp's converter

@pytest.mark.parametrize("name,ttype", [("pico-base", "q8_0"), ("tiny-random-llama3", "f32")])
def test_same_tensors_and_metadata_as_llama_cpp_converter(name, ttype, export, converted):
    ours, theirs = read_gguf(export(name, ttype)), read_gguf(converted(name, ttype))
    a, b = ({n: (t.type, t.shape, bytes(t.data)) for n, t in f.tensors.items()} for f in (ours, theirs))
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    ma, mb = ours.metadata, theirs.metadata
    differ = {k for k in ma.keys() | mb.keys() if ma.get(k) != mb.get(k)} - DIFFERENT_KEYS
    if name == "pico-base":
        # pico-base's tokenizer_config lists <unk> <s> </s> as added tokens: the converter then
        # retypes <unk> as control and gives all three score -1000; we keep SentencePiece's own
        # types and scores, and also write the unknown id
        differ -= {"tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.unknown_token_id",
                   "tokenizer.chat_template",  # ours: the alpaca template we passed
                   "tokenizer.ggml.add_space_prefix"}  # ours: false (see model/gguf_vocab.py)
        assert ma["tokenizer.ggml.token_type"][:3] == [2, 3, 3] and mb["tokenizer.ggml.token_type"][:3] == [3, 3, 3]
    assert not differ, {k: (ma.get(k), mb.get(k)) for k in differ}


# ----------------------------------------------------------------------------- llama.cpp runs them

@pytest.fixture
def llama(monkeypatch):
    """llama(path, **kw) -> llama_cpp.Llama with small context, 1 thread, all logits kept."""
    llama_cpp = pytest.importorskip("llama_cpp")
    # llama.cpp repacks Q8_0/Q4_0 weights for AMX tile instructions when the CPU reports them;
    # this machine's sandbox then dies with SIGILL (the converter's files too). Plain buffers
    # compute the same products, so turn the "extra buffer types" off.
    default = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        p = default()
        p.use_extra_bufts = False
        return p
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_buffers)
    opened = []

    def open_(path, **kw):
        opened.append(llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=True,
                                      verbose=False, **kw))
        return opened[-1]
    yield open_
    for llm in opened:
        llm.close()


def llama_greedy(llm, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """Logits of every prompt position, then n greedy tokens."""
    llm.reset()
    llm.eval(prompt)
    logits = np.array(llm.scores[:len(prompt)])
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return logits, out


def shared_texts(shared_file) -> list[str]:
    prompts = [json.loads(line)["prompt"] for line in shared_file("data/ifeval_input_data.jsonl").read_text().splitlines()[:20]]
    return TEXTS + prompts


def test_llama_cpp_tokenizes_pico_base_chat_prompts_like_our_tokenizer(export, llama, shared_file):
    """Text after a special token, as in every chat prompt (they start with BOS). Without one,
    llama.cpp's first word lacks the dummy-prefix "▁" our (non-legacy HF) tokenizer gives it."""
    from model import Tokenizer
    tok = Tokenizer.from_pretrained(shared_file("models/pico-base"))
    llm = llama(export("pico-base", "f16"), vocab_only=True)
    for text in shared_texts(shared_file):
        assert llm.tokenize(("<s>" + text).encode(), add_bos=False, special=True) == tok.encode("<s>" + text), text
    # a raw prompt: llama.cpp needs the leading space spelled out
    assert llm.tokenize(b" Hello world", add_bos=True) == tok.encode("Hello world", bos=True) != llm.tokenize(b"Hello world", add_bos=True)


@pytest.mark.parametrize("name", ["tiny-random-llama3", "tiny-random-qwen2"])
def test_llama_cpp_tokenizes_byte_level_bpe_like_the_tokenizers_library(name, export, llama, shared_file):
    tokenizers = pytest.importorskip("tokenizers")
    ref = tokenizers.Tokenizer.from_file(str(shared_file(f"models/{name}") / "tokenizer.json"))
    llm = llama(export(name, "q8_0"), vocab_only=True)
    # llama.cpp makes the text "</s>" a control token in every vocabulary (an EOG-name list in
    # llama-vocab.cpp), though Qwen's "</s>" is an ordinary token; texts with it are left out
    for text in [t for t in shared_texts(shared_file) if "</s>" not in t]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ref.encode(text).ids, text


@pytest.mark.parametrize("ttype", ["f32", "f16", "q8_0"])
def test_pico_logits_as_close_to_ours_as_the_converters_files(ttype, export, converted, llama, shared_file):
    from model import Tokenizer, load_pretrained
    folder = shared_file("models/pico-base")
    ids = Tokenizer.from_pretrained(folder).encode(PROMPT, bos=True)
    model = load_pretrained(folder).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    greedy = model.generate([ids], max_new_tokens=24, stop_ids=())[0]
    results = {}
    for who, path in (("ours", export("pico-base", ttype)), ("converter", converted("pico-base", ttype))):
        logits, tokens = llama_greedy(llama(path), ids, 24)
        results[who] = (float(np.abs(logits - ref).max()), sum(a == b for a, b in zip(tokens, greedy)))
    print(f"\npico-base {ttype}: max |llama.cpp - ours fp32| and greedy tokens equal of 24: {results}")
    assert results["ours"][0] <= results["converter"][0] + 1e-6
    assert results["ours"][1] >= results["converter"][1]
    assert results["ours"][1] == 24  # (q8_0 keeps 8 of 24 after "..., the little girl went to the": a near tie)


@pytest.mark.parametrize("name", FOLDERS[1:])
def test_llama_cpp_logits_of_random_families_match_transformers(name, export, llama, shared_file):
    transformers = pytest.importorskip("transformers")
    folder = shared_file(f"models/{name}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    llm = llama(export(name, "f32"))
    ids = llm.tokenize(TEXTS[3].encode(), add_bos=True, special=True)[:16]  # within Mistral's window of 16
    logits, _ = llama_greedy(llm, ids, 0)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(logits - ref).max())
    print(f"\n{name} f32: max |llama.cpp - transformers fp32| = {diff:.2e} (logits up to {np.abs(ref).max():.2f})")
    assert diff < 1e-3


@pytest.mark.parametrize("name", ["pico-base", "tiny-random-qwen2", "tiny-random-llama3"])
def test_llama_cpp_reads_the_chat_template_and_renders_our_prompt(name, export, llama, shared_file):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    folder = shared_file(f"models/{name}")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    stored = llama(export(name, "q8_0"), vocab_only=True).metadata["tokenizer.chat_template"]
    assert stored == (alpaca() if name == "pico-base" else config["chat_template"])
    if name == "pico-base":
        from data.templates import render
        messages = [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red."},
                    {"role": "user", "content": "And two more?"}]
        got = Jinja2ChatFormatter(stored, eos_token="</s>", bos_token="<s>")(messages=messages).prompt
        assert got == render("alpaca", messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    elif name == "tiny-random-qwen2":
        transformers = pytest.importorskip("transformers")
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Bye"}]
        want = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
        assert Jinja2ChatFormatter(stored, eos_token="<|im_end|>", bos_token="")(messages=messages).prompt == want


def test_pico_chat_prompt_rendered_and_tokenized_by_llama_cpp_gives_our_greedy_reply(export, llama, shared_file):
    """The whole chat path in llama.cpp: the template from the file renders the prompt, llama.cpp
    tokenizes it, and greedy decoding of the f32 file gives our model's 24 tokens."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from data.templates import render
    from model import Tokenizer, load_pretrained
    folder = shared_file("models/pico-base")
    tok, model = Tokenizer.from_pretrained(folder), load_pretrained(folder).eval()
    messages = [{"role": "user", "content": "Write a short story about a dog."}]
    ids = tok.encode(render("alpaca", messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"))
    llm = llama(export("pico-base", "f32"))
    prompt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")(messages=messages).prompt
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert tokens == ids
    assert llama_greedy(llm, tokens, 24)[1] == model.generate([ids], max_new_tokens=24, stop_ids=())[0]
