"""Streaming merged export (lora.save_merged): a LoRA / QLoRA model written as a full HF checkpoint
one weight at a time reloads with the logits of the model merged in memory, sharded or not,
while the writer never holds more than one produced weight."""
import copy
import functools
import json
import weakref

import pytest
import torch

import lora
from model.checkpoint import load_pretrained, save_pretrained
from model.errors import SFTError
from model.nf4 import Linear4bit, load_quantized
from model.safetensors import LazyTensor, save_file

IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 250, 17, 8]])


@functools.cache
def _base(folder, quantized: bool):
    """pico-base in fp32 or NF4, loaded once (quantizing is the slow part); tests take copies."""
    return load_quantized(folder, torch.float32) if quantized else load_pretrained(folder)


def _lora_model(pico_dir, quantized: bool, targets=("q_proj", "v_proj", "down_proj")):
    """A copy of pico-base (NF4 base if quantized) with LoRA whose update is not zero."""
    model = copy.deepcopy(_base(pico_dir, quantized))
    lora.apply_lora(model, r=4, alpha=8, targets=targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).float()


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_streamed_export_reloads_with_the_logits_of_the_in_memory_merge(pico_dir, tmp_path, quantized):
    model = _lora_model(pico_dir, quantized)
    before = _logits(model)
    lora.save_merged(model, tmp_path / "merged")
    assert lora.lora_layers(model), "save_merged must leave the model unmerged"
    assert torch.equal(_logits(model), before)
    reloaded = _logits(load_pretrained(tmp_path / "merged"))
    in_memory = _logits(lora.merge_lora(model))
    assert (in_memory - before).abs().max() < 1e-4          # the merge is the LoRA forward
    assert (reloaded - in_memory).abs().max() <= 1e-5
    if quantized:   # QLoRA quantizes every linear: untargeted ones are dequantized too
        assert any(isinstance(m, Linear4bit) for m in model.modules())


def test_merged_weights_equal_merge_lora_bit_for_bit_and_tied_head_is_left_out(pico_dir, tmp_path):
    model = _lora_model(pico_dir, quantized=True)
    lora.save_merged(model, tmp_path / "merged")
    saved = load_pretrained(tmp_path / "merged").state_dict()
    lora.merge_lora(model)
    for name in ("layers.0.self_attn.q_proj.weight", "layers.5.mlp.down_proj.weight"):
        assert torch.equal(saved[name], model.state_dict()[name])
    assert torch.equal(saved["layers.0.self_attn.k_proj.weight"],
                       model.layers[0].self_attn.k_proj.dequantize())
    header = (tmp_path / "merged" / "model.safetensors").read_bytes()
    keys = json.loads(header[8:8 + int.from_bytes(header[:8], "little")])
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"]


def test_sharded_streamed_export_reloads_identically(pico_dir, tmp_path):
    model = _lora_model(pico_dir, quantized=True, targets="all-linear")
    lora.save_merged(model, tmp_path / "one")
    lora.save_merged(model, tmp_path / "sharded", max_shard_bytes=1 << 20)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    one, sharded = load_pretrained(tmp_path / "one"), load_pretrained(tmp_path / "sharded")
    for name, t in one.state_dict().items():
        assert torch.equal(t, sharded.state_dict()[name]), name


def test_writer_holds_at_most_one_produced_tensor_at_a_time(pico_dir, tmp_path):
    model = _lora_model(pico_dir, quantized=True, targets="all-linear")
    state = lora.merged_state_dict(model)
    assert sum(isinstance(v, LazyTensor) for v in state.values()) == 6 * 7
    live, peak, made = [0], [0], [0]

    def counted(make):
        def produce():
            t = make().clone()          # a fresh tensor for every entry, owned by the writer only
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            made[0] += 1
            weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
            return t
        return produce

    lazy = {k: LazyTensor(tuple(v.shape), v.dtype, counted(v.make if isinstance(v, LazyTensor) else lambda v=v: v))
            for k, v in state.items()}
    save_pretrained(model, tmp_path / "merged", state_dict=lazy, max_shard_bytes=1 << 20)
    assert made[0] == len(state) - 1                       # tied lm_head is never produced
    assert peak[0] == 1 and live[0] == 0


def test_a_lazy_tensor_that_breaks_its_declared_shape_is_an_error(tmp_path):
    bad = LazyTensor((2, 3), torch.float32, lambda: torch.zeros(3, 2))
    with pytest.raises(SFTError, match=r"'w' was declared \(2, 3\)"):
        save_file({"w": bad}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_save_pretrained_still_refuses_an_unmerged_lora_model(pico_dir, tmp_path):
    model = _lora_model(pico_dir, quantized=True)
    with pytest.raises(SFTError, match="weights a plain model lacks"):
        save_pretrained(model, tmp_path / "full")
    assert not (tmp_path / "full").exists()


def test_lora_on_a_tied_head_is_refused_rather_than_silently_dropped(pico_dir, tmp_path):
    model = _lora_model(pico_dir, quantized=False, targets=("lm_head",))
    with pytest.raises(SFTError, match="tied"):
        lora.save_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
