"""LoRA / QLoRA (lora.py): the update starts at zero, merges exactly, trains only itself,
and round-trips through PEFT's adapter layout."""
import json

import pytest
import torch
from torch import nn

import lora
from model.errors import SFTError
from model.llama import Config, Transformer
from model.loss import masked_ce_sum
from model.nf4 import Linear4bit, quantize_model_linears

TINY = Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(Config(**{**TINY.__dict__}))


def randomize_lora_b(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def ids(n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (n, t), generator=torch.Generator().manual_seed(7))


def test_fresh_adapter_leaves_the_model_unchanged():
    model = tiny_model()
    with torch.no_grad():
        before = model(ids())
        lora.apply_lora(model, r=4, alpha=8)
        assert torch.equal(model(ids()), before)                  # B = 0
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, lora.LoRALinear) and layer.scaling == 2.0
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (32, 4)
    assert layer.lora_A.weight.abs().sum() > 0                   # A is not zero: B gets a gradient


def test_rslora_scales_by_alpha_over_sqrt_r():
    model = lora.apply_lora(tiny_model(), r=16, alpha=8, use_rslora=True)
    assert model.layers[1].self_attn.v_proj.scaling == pytest.approx(8 / 4)


def test_all_linear_targets_every_projection_but_the_head():
    model = lora.apply_lora(tiny_model(), targets="all-linear")
    assert set(lora.adapter_config(model).target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert type(model.lm_head) is nn.Linear and len(lora.lora_layers(model)) == 14


def test_unknown_target_is_a_clear_error():
    with pytest.raises(SFTError, match="match no linear"):
        lora.apply_lora(tiny_model(), targets=("qkv",))


def test_merged_layer_equals_the_lora_forward_and_unmerge_restores_it():
    model = lora.apply_lora(tiny_model(), r=4, alpha=8, targets="all-linear")
    randomize_lora_b(model)
    layer = model.layers[0].mlp.up_proj
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 32)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), y, atol=1e-5)
        assert torch.allclose(layer.base_layer(x), y, atol=1e-5)   # the update lives in W now
        layer.unmerge()
        assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
        assert torch.allclose(layer(x), y, atol=1e-6)


def test_merge_lora_gives_plain_linears_with_the_same_logits():
    model = lora.apply_lora(tiny_model(), r=4, alpha=8, targets="all-linear")
    randomize_lora_b(model)
    with torch.no_grad():
        before = model(ids())
        lora.merge_lora(model)
        after = model(ids())
    assert not lora.lora_layers(model) and type(model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.allclose(before, after, atol=1e-4)


def test_qlora_merge_dequantizes_into_a_full_precision_linear():
    model = quantize_model_linears(tiny_model())
    lora.apply_lora(model, r=4, alpha=8, targets="all-linear")
    randomize_lora_b(model)
    with torch.no_grad():
        before = model(ids())
        layer = model.layers[0].self_attn.o_proj
        layer.merge()
        assert type(layer.base_layer) is nn.Linear
        layer.unmerge()
        assert isinstance(layer.base_layer, Linear4bit)
        lora.merge_lora(model)
        after = model(ids())
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("quantized", [False, True])
def test_an_optimizer_step_changes_only_lora_parameters(quantized):
    model = tiny_model()
    if quantized:
        quantize_model_linears(model)
    lora.apply_lora(model, r=4, alpha=8, targets="all-linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    loss, n = masked_ce_sum(model, model(x, return_hidden=True), x)
    (loss / n).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)


def test_train_embeddings_and_head_are_optional_extras():
    model = lora.apply_lora(tiny_model(), train_embeddings=True)
    assert model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert lora.adapter_config(model).modules_to_save == ["embed_tokens"]


def test_save_then_load_adapter_round_trips_in_peft_layout(tmp_path):
    model = lora.apply_lora(tiny_model(), r=4, alpha=16, targets=("q_proj", "down_proj"))
    randomize_lora_b(model)
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 16, ["down_proj", "q_proj"])
    from model.safetensors import load_file
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 8

    fresh = lora.load_adapter(tiny_model(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(ids()), model(ids()))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folder left


def test_load_adapter_rejects_a_different_shape(tmp_path):
    model = lora.apply_lora(tiny_model(), r=4)
    lora.save_adapter(model, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(SFTError, match="shape"):
        lora.load_adapter(tiny_model(), tmp_path / "a")
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(SFTError, match="use_dora"):
        lora.load_adapter(tiny_model(), tmp_path / "a")


# ----------------------------------------------------------------------------- real training

def _alpaca_batches(tokenizer, path, n_train=24, n_eval=8, max_len=96):
    from data.formats import load_conversations
    from data.masking import tokenize_conversation
    samples = []
    for conv in load_conversations(path)[: 4 * (n_train + n_eval)]:
        s = tokenize_conversation(tokenizer, "alpaca", conv, max_len=max_len)
        if s is not None:
            samples.append(s)
    assert len(samples) >= n_train + n_eval

    def collate(rows):
        T = max(len(r["input_ids"]) for r in rows)
        x = torch.tensor([r["input_ids"] + [0] * (T - len(r["input_ids"])) for r in rows])
        y = torch.tensor([r["labels"] + [-100] * (T - len(r["labels"])) for r in rows])
        return x, y
    train = [collate(samples[i:i + 4]) for i in range(0, n_train, 4)]
    return train, collate(samples[n_train:n_train + n_eval])


def _loss(model, x, y):
    total, n = masked_ce_sum(model, model(x, return_hidden=True), y)
    return total / n


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_and_qlora_on_pico_lower_held_out_loss(pico_dir, shared_file, quantized):
    from model import Tokenizer, load_pretrained
    from model.nf4 import load_quantized
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(pico_dir)
    train, (ex, ey) = _alpaca_batches(tok, shared_file("data/llamafactory_alpaca_en_demo.json"))
    model = load_quantized(pico_dir, torch.float32) if quantized else load_pretrained(pico_dir)
    lora.apply_lora(model, r=8, alpha=16, targets="all-linear")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    with torch.no_grad():
        before = _loss(model, ex, ey).item()
    for _ in range(2):
        for x, y in train:
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
    with torch.no_grad():
        after = _loss(model, ex, ey).item()
    print(f"\n{'QLoRA' if quantized else 'LoRA'} on pico-base, 12 steps: held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.05, (before, after)


def test_load_adapter_reports_missing_tensors(tmp_path):
    from model.safetensors import load_file, save_file
    model = lora.apply_lora(tiny_model(), r=4)
    lora.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors = {k: v.clone() for k, v in tensors.items() if ".layers.1.self_attn.v_proj." not in k}
    save_file(tensors, path)
    with pytest.raises(SFTError, match="missing 2 adapter tensors"):
        lora.load_adapter(tiny_model(), tmp_path / "a")


def test_bf16_lora_keeps_its_input_not_an_fp32_copy_with_the_same_gradients():
    """The fp32 adapter of a bf16 (or 4-bit) model keeps the bf16 input for backward, once for
    q/k/v together, instead of one fp32 copy per projection; the gradients are the same bits."""
    def run(old_path: bool):
        torch.manual_seed(0)
        model = lora.apply_lora(quantize_model_linears(tiny_model().to(torch.bfloat16), torch.bfloat16),
                                r=4, targets="all-linear")
        randomize_lora_b(model)
        if old_path:  # a Dropout(0) takes the plain module path: autograd keeps x.to(fp32)
            for layer in lora.lora_layers(model).values():
                layer.lora_dropout = nn.Dropout(0.0)
        saved = {}  # bytes kept for backward, per storage

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = masked_ce_sum(model, model(ids(), return_hidden=True), ids())
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return sum(saved.values()), grads
    new_bytes, new = run(False)
    old_bytes, old = run(True)
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    print(f"\nbytes kept for backward: {new_bytes} (bf16 input) vs {old_bytes} (fp32 copies)")
    assert new_bytes < 0.8 * old_bytes, (new_bytes, old_bytes)
