"""Our LoRA against PEFT on transformers' LlamaForCausalLM, same base weights (pico-base).

Forward logits and LoRA gradients must agree; an adapter saved by us must load in PEFT and one
saved by PEFT must load in ours, giving the same logits. Run with -s to see the figures.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lora  # noqa: E402
from model import load_pretrained  # noqa: E402


def _peft_model(pico_dir, **kw):
    hf = transformers.LlamaForCausalLM.from_pretrained(pico_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", **kw)
    return peft.get_peft_model(hf, cfg)


def _randomize(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _copy_peft_into_ours(pm, ours):
    peft_params = dict(pm.named_parameters())
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            for part in ("lora_A", "lora_B"):
                src = peft_params[f"base_model.model.{lora.hf_name(name)}.{part}.default.weight"]
                getattr(layer, part).weight.copy_(src)


def _ids(vocab):
    return torch.randint(3, vocab, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_forward_and_gradients_equal_peft(pico_dir, use_rslora):
    pm = _peft_model(pico_dir, target_modules="all-linear", use_rslora=use_rslora)
    _randomize(pm)
    ours = lora.apply_lora(load_pretrained(pico_dir), r=8, alpha=16, targets="all-linear", use_rslora=use_rslora)
    _copy_peft_into_ours(pm, ours)
    x = _ids(ours.config.vocab_size)
    ref = pm(input_ids=x).logits
    got = ours(x)
    fwd = (ref - got).abs().max().item()
    ref.float().logsumexp(-1).sum().backward()
    got.float().logsumexp(-1).sum().backward()
    peft_grads = {n.replace(".default", "").removeprefix("base_model.model."): p.grad
                  for n, p in pm.named_parameters() if p.requires_grad}
    worst = 0.0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            g = peft_grads[lora.hf_name(name)]
            worst = max(worst, ((p.grad - g).norm() / g.norm()).item())
    print(f"\nrslora={use_rslora}: max |logit diff| {fwd:.2e} (logits max {ref.abs().max().item():.1f}); "
          f"worst relative LoRA-gradient difference {worst:.2e} over {len(peft_grads)} tensors")
    assert fwd < 1e-4 and worst < 1e-4
    assert len(peft_grads) == sum(p.requires_grad for p in ours.parameters())


def test_our_adapter_loads_in_peft_with_the_same_logits(pico_dir, tmp_path):
    ours = lora.apply_lora(load_pretrained(pico_dir), r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora.lora_layers(ours).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    lora.save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(pico_dir))
    hf = transformers.LlamaForCausalLM.from_pretrained(pico_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours")
    x = _ids(ours.config.vocab_size)
    with torch.no_grad():
        diff = (pm(input_ids=x).logits - ours(x)).abs().max().item()
    print(f"\nour adapter in PEFT: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    assert pm.peft_config["default"].r == 8 and set(pm.peft_config["default"].target_modules) == {
        "q_proj", "v_proj", "down_proj"}


def test_peft_adapter_loads_in_ours_with_the_same_logits(pico_dir, tmp_path):
    pm = _peft_model(pico_dir, target_modules=["k_proj", "o_proj", "gate_proj"])
    _randomize(pm, seed=3)
    pm.save_pretrained(tmp_path / "peft")
    ours = lora.load_adapter(load_pretrained(pico_dir), tmp_path / "peft")
    x = _ids(ours.config.vocab_size)
    with torch.no_grad():
        diff = (pm(input_ids=x).logits - ours(x)).abs().max().item()
        merged = (pm(input_ids=x).logits - lora.merge_lora(ours)(x)).abs().max().item()
    print(f"\nPEFT adapter in ours: max |logit diff| {diff:.2e}; after merge_lora {merged:.2e}")
    assert diff < 1e-4 and merged < 1e-4
    assert len(lora.lora_layers(load_pretrained(pico_dir))) == 0


def test_modules_to_save_round_trip_with_peft(tmp_path, tiny_llama2_dir):
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tiny_llama2_dir, dtype=torch.float32),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                             modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    _randomize(pm, seed=4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.01)
    pm.save_pretrained(tmp_path / "peft")
    ours = lora.load_adapter(load_pretrained(tiny_llama2_dir), tmp_path / "peft")
    assert ours.embed_tokens.weight.requires_grad and ours.lm_head.weight.requires_grad
    x = _ids(ours.config.vocab_size)
    with torch.no_grad():
        diff = (pm(input_ids=x).logits - ours(x)).abs().max().item()
    print(f"\nPEFT adapter with modules_to_save in ours: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
