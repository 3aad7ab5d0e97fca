"""Parity with transformers.LlamaForCausalLM / LlamaTokenizer (optional extra `parity`).

Run: /work/parity-venv/bin/python -m pytest tests/parity/test_model_parity.py -s
(-s prints the measured max abs differences.)
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf")  # transformers 5 needs it to read tokenizer.model

from model import Tokenizer, load_pretrained, save_pretrained  # noqa: E402

TOL = 1e-4
TEXTS = ["Once upon a time", "The little girl went to the market and bought two apples."]


def hf_model(folder):
    return transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def padded_batch(tok, texts):
    """Right-padded batch of different lengths, with an attention mask for transformers."""
    rows = [tok.encode(t, bos=True) for t in texts]
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return rows, ids, mask


def max_logit_diff(ours, hf, folder):
    tok = Tokenizer.from_pretrained(folder)
    rows, ids, mask = padded_batch(tok, TEXTS)
    with torch.no_grad():
        a = ours(ids)
        b = hf(input_ids=ids, attention_mask=mask).logits
    # right padding: real tokens never attend to the padding after them, so compare those
    return max((a[i, :len(r)] - b[i, :len(r)]).abs().max().item() for i, r in enumerate(rows))


@pytest.fixture(params=["pico", "tiny_llama2"])
def folder(request, pico_dir, tiny_llama2_dir):
    return pico_dir if request.param == "pico" else tiny_llama2_dir


def test_fp32_logits_match_transformers_on_a_batch_of_two_lengths(folder):
    diff = max_logit_diff(load_pretrained(folder), hf_model(folder), folder)
    print(f"\n{folder.name}: max |logits - HF logits| = {diff:.3e}")
    assert diff <= TOL


def test_greedy_40_tokens_identical_to_transformers(folder):
    tok = Tokenizer.from_pretrained(folder)
    ours, hf = load_pretrained(folder), hf_model(folder)
    for text in TEXTS:
        prompt = tok.encode(text, bos=True)
        mine = ours.generate([prompt], max_new_tokens=40, stop_ids=())[0]
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=40, min_new_tokens=40, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert mine == out[0, len(prompt):].tolist()


def test_batched_generation_matches_transformers_unbatched(pico_dir):
    tok = Tokenizer.from_pretrained(pico_dir)
    ours, hf = load_pretrained(pico_dir), hf_model(pico_dir)
    prompts = [tok.encode(t, bos=True) for t in TEXTS]
    mine = ours.generate(prompts, max_new_tokens=20, stop_ids=())
    for p, m in zip(prompts, mine):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert m == out[0, len(p):].tolist()


def test_checkpoint_we_save_loads_in_transformers_with_the_same_logits(folder, tmp_path):
    ours = load_pretrained(folder)
    save_pretrained(ours, tmp_path / "out", tokenizer=Tokenizer.from_pretrained(folder),
                    max_shard_bytes=1 << 20)
    diff = max_logit_diff(ours, hf_model(tmp_path / "out"), folder)
    print(f"\n{folder.name} saved by us: max |logits - HF logits| = {diff:.3e}")
    assert diff <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf_tok("Hello world")["input_ids"] == Tokenizer.from_pretrained(folder).encode("Hello world", bos=True)


PLAIN = ["Hello world", "Once upon a time, there was a girl.", " leading space", "tabs\tand\nnewlines\n",
         "Numbers 12345 and 3.14!", "Élan café naïve 😀 日本語", "<s>[INST] Hi there [/INST] Hello! </s>",
         "a</s>b", "</s> after a special token", "trailing space "]


def test_tokenizer_encode_matches_transformers_on_plain_text(folder):
    ours = Tokenizer.from_pretrained(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in PLAIN:
        assert ours.encode(text, bos=True) == hf(text)["input_ids"], text
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_scaling_matches_transformers_at_long_positions(scaling, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   rope_parameters={"rope_theta": 10000.0, **scaling})
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    hf, ours = hf_model(tmp_path).eval(), load_pretrained(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == scaling["rope_type"]
    ids = torch.randint(0, 128, (2, 24))
    pos = torch.arange(24).expand(2, 24) + torch.tensor([[0], [2000]])  # far past the original context
    with torch.no_grad():
        diff = (ours(ids, position_ids=pos) - hf(input_ids=ids, position_ids=pos).logits).abs().max().item()
    print(f"\n{scaling['rope_type']} rope scaling: max |logits - HF logits| = {diff:.3e}")
    assert diff <= TOL


def test_bf16_logits_close_to_transformers_bf16(pico_dir):
    ours = load_pretrained(pico_dir, dtype=torch.bfloat16)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(pico_dir), dtype=torch.bfloat16).eval()
    ids = torch.tensor([Tokenizer.from_pretrained(pico_dir).encode(TEXTS[1], bos=True)])
    with torch.no_grad():
        diff = (ours(ids).float() - hf(input_ids=ids).logits.float()).abs().max().item()
    print(f"\npico-base bf16: max |logits - HF logits| = {diff:.3e}")
    assert diff <= 1e-2


def test_added_special_tokens_we_save_encode_the_same_in_transformers(tiny_llama2_dir, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_llama2_dir)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n Hello!<|im_end|>"
    assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert len(hf) == tok.vocab_size == 32002
