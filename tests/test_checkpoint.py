"""Specs for model/checkpoint.py: HF folder <-> Transformer, exactly and safely."""
import json
import shutil

import pytest
import torch
from torch import nn

from model import Tokenizer, load_pretrained, save_pretrained
from model.checkpoint import hf_state_dict
from model.errors import SFTError
from model.safetensors import load_file, save_file


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_save_then_load_round_trip_is_bit_identical_with_tokenizer_and_stop_ids(pico_dir, tmp_path):
    model = load_pretrained(pico_dir)
    tok = Tokenizer.from_pretrained(pico_dir)
    save_pretrained(model, tmp_path / "out", tokenizer=tok, generation_config={"eos_token_id": [2, 7]})
    back = load_pretrained(tmp_path / "out")
    assert_same_weights(model, back)
    assert back.config == model.config
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["model_type"] == "llama" and cfg["tie_word_embeddings"]
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 7] and gen["bos_token_id"] == 1
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")  # tied: stored once
    assert Tokenizer.from_pretrained(tmp_path / "out").encode("Once upon") == tok.encode("Once upon")


def test_sharded_save_with_small_max_shard_reloads_identically(tiny_llama2_dir, tmp_path):
    model = load_pretrained(tiny_llama2_dir)  # itself a 3-shard checkpoint
    save_pretrained(model, tmp_path / "out", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert_same_weights(model, load_pretrained(tmp_path / "out"))


def test_load_converts_to_the_requested_dtype_and_keeps_embeddings_tied(pico_dir):
    model = load_pretrained(pico_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
    ref = load_pretrained(pico_dir)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16)), name  # slice-wise copy converts every element


def test_linear_hook_sees_each_linear_weight_and_may_replace_the_module(tiny_llama2_dir):
    seen = {}

    class Marked(nn.Linear):
        pass

    def hook(name, weight):
        seen[name] = (weight.shape, weight.dtype)
        if name.endswith("q_proj"):
            m = Marked(weight.shape[1], weight.shape[0], bias=False)
            m.weight = nn.Parameter(weight)
            return m
        return None

    model = load_pretrained(tiny_llama2_dir, dtype=torch.bfloat16, linear_hook=hook)
    assert len(seen) == 2 * 7 + 1 and "lm_head" in seen and "layers.1.mlp.down_proj" in seen
    assert seen["layers.0.self_attn.k_proj"] == ((32, 64), torch.bfloat16)
    assert isinstance(model.layers[1].self_attn.q_proj, Marked)
    assert type(model.layers[1].self_attn.k_proj) is nn.Linear
    ref = load_pretrained(tiny_llama2_dir, dtype=torch.bfloat16)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(x), ref(x))


def test_failed_save_leaves_the_existing_folder_untouched(pico_dir, tmp_path):
    model = load_pretrained(pico_dir)
    save_pretrained(model, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())

    class Broken:
        def save(self, folder):
            raise OSError("disk full")

    with pytest.raises(SFTError, match="out: cannot write"):  # an OSError becomes one line
        save_pretrained(model, tmp_path / "out", tokenizer=Broken())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left behind


def test_pytorch_model_bin_loads_with_weights_only(pico_dir, tmp_path):
    model = load_pretrained(pico_dir)
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(pico_dir / "config.json", folder)
    torch.save({k: v.clone() for k, v in hf_state_dict(model).items()}, folder / "pytorch_model.bin")
    assert_same_weights(model, load_pretrained(folder))


def test_missing_config_key_names_file_and_key(pico_dir, tmp_path):
    folder = copy_folder(pico_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SFTError, match=r"m/config.json: missing key 'num_hidden_layers'"):
        load_pretrained(folder)


def test_tensor_shape_not_matching_config_names_file_and_tensor(pico_dir, tmp_path):
    folder = copy_folder(pico_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SFTError, match=r"model.safetensors: tensor 'model.layers.0.mlp.*shape.*config.json"):
        load_pretrained(folder)


def test_missing_and_unexpected_weights_are_errors(pico_dir, tmp_path):
    folder = copy_folder(pico_dir, tmp_path / "m")
    t = load_file(folder / "model.safetensors")
    t = {k: v.clone() for k, v in t.items() if k != "model.norm.weight"}
    save_file(t, folder / "model.safetensors")
    with pytest.raises(SFTError, match=r"weights missing.*norm.weight"):
        load_pretrained(folder)
    save_file({**t, "model.norm.weight": torch.ones(256), "model.extra.bias": torch.ones(1)},
              folder / "model.safetensors")
    with pytest.raises(SFTError, match=r"model.safetensors: unexpected tensor 'model.extra.bias'"):
        load_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(SFTError, match="no weights"):
        load_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(SFTError, match=r"m/config.json: missing"):
        load_pretrained(folder)
