"""Parity with transformers on the four modern families: Llama-3.x, Qwen2.5, Qwen3, Mistral.

Run: /work/parity-venv/bin/python -m pytest tests/parity/test_families_parity.py -s
(-s prints the measured figures.)

The tiny checkpoints in ../shared/models are transformers' own initialisation: every bias is 0
and every norm weight 1, so a missing bias or q/k norm weight would still agree. Each test
therefore runs on a copy whose biases and norm weights are random (`perturbed`). The bf16
checkpoints are compared in fp32 on both sides (the bf16 -> fp32 upcast is exact). Prompts are
longer than Mistral's 16-token window, so the window is inside every comparison, including
greedy decoding through the KV cache.
"""
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lora  # noqa: E402
from model import Tokenizer, load_pretrained, save_pretrained  # noqa: E402
from model.safetensors import load_file, save_file  # noqa: E402

TOL = 1e-4
FAMILIES = ["llama3", "qwen2", "qwen3", "mistral"]
TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting each of the "
        "one hundred and twelve steps, and lit the lamp that warned the fishing boats away from "
        "the rocks. In winter the storms came early; the waves broke over the harbour wall and "
        "the wind howled through the cracks of the tower. One night a small boat with a torn sail "
        "drifted towards the reef, and the keeper, who was seventy years old, ran down to the shore.")


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, shared_file, tmp_path_factory):
    """A copy of tiny-random-<family> whose biases and norm weights are random, not 0 and 1."""
    src = shared_file(f"models/tiny-random-{request.param}")
    dst = tmp_path_factory.mktemp(request.param) / request.param
    shutil.copytree(src, dst)
    for path in (dst, *dst.iterdir()):  # the shared folder is read-only, and so is the copy
        path.chmod(0o755 if path.is_dir() else 0o644)
    g = torch.Generator().manual_seed(0)
    tensors = {k: v.clone() for k, v in load_file(dst / "model.safetensors").items()}
    for name, t in tensors.items():
        if name.endswith(".bias") or name.endswith("norm.weight"):
            noise = torch.randn(t.shape, generator=g) * (0.5 if name.endswith(".bias") else 0.2)
            tensors[name] = (noise + (0 if name.endswith(".bias") else 1)).to(t.dtype)
    save_file(tensors, dst / "model.safetensors")
    return dst


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def prompts(tok):
    """Two prompts of different lengths (40 and 80 tokens), both past a 16-token window."""
    ids = tok.encode(TEXT, bos=True)
    return [ids[:40], ids[:80]]


def max_logit_diff(ours, hf, tok) -> float:
    rows = prompts(tok)
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])  # right padding: compare real tokens
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        a = ours(ids)
        b = hf(input_ids=ids, attention_mask=mask).logits
    return max((a[i, :len(r)] - b[i, :len(r)]).abs().max().item() for i, r in enumerate(rows))


def test_fp32_logits_match_transformers_past_the_window(folder):
    tok = Tokenizer.from_pretrained(folder)
    diff = max_logit_diff(load_pretrained(folder), hf_model(folder), tok)
    print(f"\n{folder.name}: max |logits - HF logits| = {diff:.3e} on prompts of "
          f"{[len(p) for p in prompts(tok)]} tokens")
    assert diff <= TOL


def test_greedy_30_tokens_identical_to_transformers(folder):
    tok = Tokenizer.from_pretrained(folder)
    ours, hf = load_pretrained(folder), hf_model(folder)
    for prompt in prompts(tok):
        mine = ours.generate([prompt], max_new_tokens=30, stop_ids=())[0]
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=30, min_new_tokens=30, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        theirs = out[0, len(prompt):].tolist()
        print(f"\n{folder.name}: greedy 30 after {len(prompt)} prompt tokens: "
              f"{sum(a == b for a, b in zip(mine, theirs))}/30 equal")
        assert mine == theirs


def test_folder_we_save_loads_in_transformers_with_the_same_logits(folder, tmp_path):
    tok = Tokenizer.from_pretrained(folder)
    ours = load_pretrained(folder)
    save_pretrained(ours, tmp_path / "out", tokenizer=tok)
    hf = hf_model(tmp_path / "out")
    assert type(hf).__name__ == ours.config.to_hf()["architectures"][0]
    diff = max_logit_diff(ours, hf, tok)
    print(f"\n{folder.name} saved by us: max |logits - HF logits| = {diff:.3e}")
    assert diff <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf_tok(TEXT)["input_ids"] == tok.encode(TEXT, bos=tok.add_bos)


def test_peft_loads_our_lora_adapter_on_biased_qwen2_projections(folder, tmp_path):
    if folder.name != "qwen2":
        pytest.skip("the biased family is qwen2")
    peft = pytest.importorskip("peft")
    tok = Tokenizer.from_pretrained(folder)
    ours = lora.apply_lora(load_pretrained(folder), r=4, alpha=8, targets="all-linear")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora.lora_layers(ours).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    lora.save_adapter(ours, tmp_path / "adapter")
    hf = peft.PeftModel.from_pretrained(hf_model(folder), str(tmp_path / "adapter")).eval()
    diff = max_logit_diff(ours, hf, tok)
    print(f"\nqwen2 + our LoRA adapter in PEFT: max |logits - PEFT logits| = {diff:.3e}")
    assert diff <= TOL
