"""Specs for model/gguf.py and model/gguf_vocab.py: the container, the quantizers, the export."""
import json
import math
import struct

import pytest
import torch

from model.errors import SFTError
from model.gguf import (ALIGNMENT, ARRAY, BOOL, F32, F64, I8, I16, I32, I64, STRING, U8, U16, U32, U64,
                        TensorEntry, dequantize, encode, export_gguf, llama3_rope_factors, main,
                        permute_rope_rows, quantize_q4_0, quantize_q8_0, read_gguf, storage_type,
                        write_gguf, _round_half_away)
from model.gguf_vocab import vocab_metadata
from model.llama import Config, rope_inv_freq, rotate_half


def write(path, metadata, tensors):
    with open(path, "wb") as f:
        write_gguf(f, metadata, tensors)
    return read_gguf(path)


def entry(name, t, ttype):
    return TensorEntry(name, ttype, tuple(t.shape), lambda: t)


# ----------------------------------------------------------------------------- the container

def test_every_metadata_type_round_trips(tmp_path):
    meta = {"u8": (U8, 255), "i8": (I8, -128), "u16": (U16, 65535), "i16": (I16, -2), "u32": (U32, 2**32 - 1),
            "i32": (I32, -7), "f32": (F32, 0.5), "bool": (BOOL, True), "str": (STRING, "héllo ▁<s>"),
            "u64": (U64, 2**64 - 1), "i64": (I64, -2**63), "f64": (F64, 1e-300),
            "strs": (ARRAY, (STRING, ["a b", "", "日本"])), "ints": (ARRAY, (I32, [1, -2, 3])),
            "empty": (ARRAY, (F32, []))}
    back = write(tmp_path / "m.gguf", meta, []).metadata
    assert back == {k: (list(v[1][1]) if v[0] == ARRAY else v[1]) for k, v in meta.items()}


def test_header_is_magic_version_3_then_counts(tmp_path):
    write(tmp_path / "h.gguf", {"a": (U32, 1), "b": (U32, 2)}, [entry("t", torch.ones(4), "f32")])
    assert struct.unpack_from("<4sIQQ", (tmp_path / "h.gguf").read_bytes()) == (b"GGUF", 3, 1, 2)


def test_tensors_round_trip_aligned_with_dims_reversed(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {"a": (torch.randn(3, generator=g), "f32"), "b": (torch.randn(5, 7, generator=g), "f16"),
          "c": (torch.randn(2, 3, 64, generator=g), "q8_0"), "d": (torch.randn(4, 32, generator=g), "q4_0"),
          "e": (torch.randn(3, 2, generator=g).to(torch.bfloat16), "bf16")}
    back = write(tmp_path / "t.gguf", {"k": (STRING, "v")}, [entry(n, t, ty) for n, (t, ty) in ts.items()])
    raw = (tmp_path / "t.gguf").read_bytes()
    for name, (t, ttype) in ts.items():
        got = back.tensors[name]
        assert got.type == ttype and got.shape == tuple(t.shape) and got.offset % ALIGNMENT == 0
        assert bytes(got.data) == b"".join(bytes(c) for c in encode(t, ttype))
    # the dims stored in the tensor info of "b" are GGML order: (7, 5)
    at = raw.index(b"\x01\x00\x00\x00\x00\x00\x00\x00b")
    assert struct.unpack_from("<I2Q", raw, at + 9) == (2, 7, 5)
    assert len(raw) % ALIGNMENT == 0


def test_read_refuses_a_file_that_is_not_gguf_or_is_truncated(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(SFTError, match="not a GGUF file"):
        read_gguf(tmp_path / "x.gguf")
    write(tmp_path / "t.gguf", {}, [entry("w", torch.ones(64, 64), "f32")])
    (tmp_path / "t.gguf").write_bytes((tmp_path / "t.gguf").read_bytes()[:-100])
    with pytest.raises(SFTError, match="past the end of the file"):
        read_gguf(tmp_path / "t.gguf")


# ----------------------------------------------------------------------------- quantization

def test_round_half_away_from_zero_exactly():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -1.4999999, 126.5, 0.0])
    assert _round_half_away(x).tolist() == [1, 2, 3, -1, -3, 0, -1, 127, 0]  # floor(x + .5) gives 1 for 0.49999997


def test_q8_0_rounds_codes_half_away_from_zero():
    x = torch.zeros(1, 32)
    x[0, :7] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5])  # d = 127 / 127 = 1 exactly
    codes = quantize_q8_0(x)[0, 2:9].view(torch.int8).tolist()
    assert codes == [127, 1, 2, 3, -1, -3, 127]  # round-half-to-even would give 0, 2, 2, 0, -2, 126


def test_q8_0_error_is_at_most_half_a_step_per_block():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, 64)[:, None]
    blocks = quantize_q8_0(x)
    assert blocks.shape == (64, 34) and blocks.dtype == torch.uint8
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    err = (dequantize(blocks.reshape(-1), "q8_0", x.shape) - x).abs()
    # half a step, plus up to 127 codes times the fp16 rounding of the scale
    assert (err <= 0.5 * d + 127 * (d - x.abs().amax(1, keepdim=True) / 127).abs() + 1e-12).all()
    assert (err / x.abs().amax(1, keepdim=True)).max() < 0.5 / 127 + 2e-3


def test_q8_0_stores_multiples_of_the_scale_exactly_and_zero_blocks_as_zero():
    # each block holds integer multiples of its step s = 2^-k, with 127 s present: d = s exactly
    x = torch.randint(-127, 128, (8, 32), generator=torch.Generator().manual_seed(2)).float()
    x[:, 0] = 127
    x = x * 2.0 ** -torch.arange(8.0)[:, None]
    x[0] = 0.0
    assert torch.equal(dequantize(quantize_q8_0(x).reshape(-1), "q8_0", x.shape), x)


def test_q4_0_maps_the_largest_magnitude_to_minus_8_and_packs_low_nibbles_first():
    x = torch.linspace(-1.0, 0.5, 32)[None]  # largest magnitude is -1.0: d = 1/8, so -1.0 -> code 0
    b = quantize_q4_0(x)[0]
    assert b[:2].view(torch.float16).item() == 0.125
    codes = torch.cat([b[2:] & 0x0F, b[2:] >> 4])
    assert codes[0] == 0 and codes.tolist() == ((x[0] / 0.125) + 8.5).trunc().clamp(max=15).int().tolist()
    err = (dequantize(b, "q4_0", x.shape) - x).abs()
    assert err.max() <= 0.125 + 1e-6  # at most one step (the top code 16 is clamped to 15)


def test_encode_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(SFTError, match="not a multiple of 32"):
        list(encode(torch.zeros(2, 40), "q8_0"))


def test_storage_types_follow_llama_cpp():
    assert storage_type("blk.0.attn_norm.weight", (64,), "q8_0") == "f32"
    assert storage_type("blk.0.attn_q_norm.weight", (16,), "q4_0") == "f32"
    assert storage_type("blk.0.attn_q.bias", (64,), "f16") == "f32"
    assert storage_type("token_embd.weight", (100, 64), "q8_0") == "q8_0"
    assert storage_type("token_embd.weight", (100, 64), "q4_0") == "q8_0"
    assert storage_type("blk.0.ffn_down.weight", (64, 688), "q8_0") == "f16"  # 688 is not 32k


# ----------------------------------------------------------------------------- layout

def test_permuted_rows_turn_rotate_half_into_adjacent_pair_rotation():
    """llama.cpp's llama graph rotates pairs (2i, 2i+1); HF rotates (i, i + d/2). The row
    permutation makes the two agree on q = W x for every head."""
    heads, d, n_in = 3, 8, 5
    w, x = torch.randn(heads * d, n_in), torch.randn(n_in)
    angle = torch.rand(d // 2) * 6
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    q = (w @ x).reshape(heads, d)
    hf = q * cos + rotate_half(q) * sin                                   # (heads, d)
    qp = (permute_rope_rows(w, heads) @ x).reshape(heads, d // 2, 2)      # adjacent pairs
    c, s = angle.cos(), angle.sin()
    cpp = torch.stack([qp[..., 0] * c - qp[..., 1] * s, qp[..., 0] * s + qp[..., 1] * c], dim=-1)
    assert torch.allclose(permute_rope_rows(hf.reshape(-1, 1), heads).reshape(heads, d // 2, 2), cpp, atol=1e-5)


def test_llama3_rope_factors_divide_the_plain_frequencies_into_ours():
    s = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
    cfg = Config(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_theta=500000.0, rope_scaling=s)
    plain = rope_inv_freq(Config(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_theta=500000.0))
    factors = llama3_rope_factors(cfg)
    assert factors[0] == 1 and factors[-1] == 32 and ((factors > 1) & (factors < 32)).any()
    assert torch.allclose(plain / factors, rope_inv_freq(cfg), rtol=1e-5)


# ----------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def pico_q8(tmp_path_factory, request):
    from tests.conftest import ROOT
    folder = ROOT / "checkpoints" / "pico-base"
    if not folder.exists():
        pytest.skip("checkpoints/pico-base missing")
    out = tmp_path_factory.mktemp("gguf") / "pico.gguf"
    return folder, export_gguf(folder, out, "q8_0")


def test_pico_q8_0_export_names_types_and_bits_per_weight(pico_q8):
    folder, report = pico_q8
    f = read_gguf(report.path)
    assert report.bytes == report.path.stat().st_size and report.n_tensors == len(f.tensors) == 56
    assert "output.weight" not in f.tensors  # tied head: llama.cpp reuses token_embd
    assert report.types == {"q8_0": 37, "f16": 6, "f32": 13}  # ffn_down rows (688) are not whole blocks
    n = sum(math.prod(t.shape) for t in f.tensors.values())
    assert report.bits_per_weight == pytest.approx(8 * sum(len(t.data) for t in f.tensors.values()) / n)
    assert 8.5 < report.bits_per_weight < 10.5
    m = f.metadata
    assert (m["general.architecture"], m["llama.block_count"], m["llama.attention.head_count_kv"]) == ("llama", 6, 4)
    assert (m["general.file_type"], m["llama.rope.dimension_count"], m["llama.context_length"]) == (7, 32, 512)
    assert m["tokenizer.ggml.model"] == "llama" and len(m["tokenizer.ggml.tokens"]) == 4096
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"], m["tokenizer.ggml.add_bos_token"]) == (1, 2, True)
    assert m["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # <unk> unknown, <s> </s> control, <0x00> byte
    assert m["tokenizer.ggml.add_space_prefix"] is False  # non-legacy: "▁" only at the text start
    assert "tokenizer.chat_template" not in m  # pico-base has none


def test_q_rows_are_permuted_and_k_rows_per_kv_head(pico_q8):
    from model.safetensors import load_file
    folder, report = pico_q8
    src = load_file(folder / "model.safetensors")
    f = read_gguf(report.path)
    for name, hf, heads in (("attn_q", "q_proj", 8), ("attn_k", "k_proj", 4)):
        t = f.tensors[f"blk.0.{name}.weight"]
        want = b"".join(bytes(c) for c in encode(permute_rope_rows(src[f"model.layers.0.self_attn.{hf}.weight"], heads), "q8_0"))
        assert bytes(t.data) == want
    assert torch.equal(dequantize(f.tensors["output_norm.weight"].data, "f32", (256,)), src["model.norm.weight"])


def test_existing_output_is_refused_unless_overwrite(pico_q8, tmp_path, capsys):
    folder, _ = pico_q8
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(SFTError, match="already exists; pass --overwrite") as e:
        export_gguf(folder, out, "f16")
    assert "\n" not in str(e.value) and out.read_bytes() == b"keep"
    assert main([str(folder), str(out)]) == 2 and "error:" in capsys.readouterr().err
    assert main([str(folder), str(out), "--type", "f32", "--overwrite"]) == 0
    report_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert report_line.endswith("32.000 bits per weight") and read_gguf(out).metadata["general.file_type"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left


def test_chat_template_argument_is_stored(pico_q8, tmp_path):
    folder, _ = pico_q8
    jinja = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    report = export_gguf(folder, tmp_path / "c.gguf", "f16", template_jinja=jinja)
    assert read_gguf(report.path).metadata["tokenizer.chat_template"] == jinja


def _folder_copy(src, dst, config_change=None):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).symlink_to(p.resolve())
    if config_change:
        (dst / "config.json").unlink()
        (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **config_change}))
    return dst


def test_unknown_architecture_is_a_one_line_error(pico_q8, tmp_path):
    folder, _ = pico_q8
    bad = _folder_copy(folder, tmp_path / "gpt2", {"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(SFTError, match=r"config.json: architectures \['GPT2LMHeadModel'\] cannot be exported") as e:
        export_gguf(bad, tmp_path / "x.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


def test_sliding_window_caps_the_context_length(pico_q8, tmp_path):
    folder, _ = pico_q8
    swa = _folder_copy(folder, tmp_path / "swa", {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                                  "sliding_window": 128})
    m = read_gguf(export_gguf(swa, tmp_path / "s.gguf", "f16").path).metadata
    assert (m["llama.context_length"], m["llama.attention.sliding_window"]) == (128, 128)


def test_byte_level_bpe_vocab_with_added_tokens_and_an_unknown_split_is_refused(tmp_path):
    from model.gguf_vocab import SPLIT_NAMES
    qwen_split = [k for k, v in SPLIT_NAMES.items() if v == "qwen2"][0]
    tj = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": qwen_split}}, {"type": "ByteLevel"}]},
          "added_tokens": [{"id": 3, "content": "<|im_end|>", "special": True},
                           {"id": 4, "content": "<think>", "special": False}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 3}))
    m = {k: v[1] for k, v in vocab_metadata(tmp_path, 6).items()}
    assert m["tokenizer.ggml.tokens"] == (STRING, ["a", "b", "ab", "<|im_end|>", "<think>", "[PAD5]"])
    assert m["tokenizer.ggml.token_type"] == (I32, [1, 1, 1, 3, 4, 5])
    assert m["tokenizer.ggml.merges"] == (STRING, ["a b"]) and m["tokenizer.ggml.pre"] == "qwen2"
    assert (m["tokenizer.ggml.eos_token_id"], m["tokenizer.ggml.bos_token_id"]) == (3, 3)  # bos from config.json
    assert m["tokenizer.ggml.add_bos_token"] is False
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(SFTError, match=r"tokenizer.json: pre_tokenizer split pattern .* is not one llama.cpp knows"):
        vocab_metadata(tmp_path, 6)


def test_a_training_run_writes_its_gguf_with_the_chat_template_it_learned(tiny_dir, tmp_path):
    from data.jinja_sources import KNOWN_JINJA
    from model.gguf import read_gguf
    from training.config import load_config
    from training.loop import train
    common = [f"model.path={tiny_dir}", f"run.out_dir={tmp_path}", "data.max_records=12", "data.max_seq_len=64",
              "data.template=alpaca", "train.batch_size=2", "train.max_steps=2", "eval.sample_prompts=0",
              "export.gguf=q8_0"]
    with pytest.raises(SFTError, match="export.gguf=q8_0 with model.finetune=lora .* lora.save_merged=true"):
        load_config(None, common + ["run.name=lora", "model.finetune=lora"])
    for name, extra in (("full", []), ("lora", ["model.finetune=lora", "lora.save_merged=true"])):
        summary = train(load_config(None, common + [f"run.name={name}", *extra]))
        path = tmp_path / name / f"{name}-q8_0.gguf"
        assert summary["gguf"] == str(path)
        meta = read_gguf(path).metadata
        assert meta["tokenizer.chat_template"] == KNOWN_JINJA["alpaca"]  # pico has none of its own
        assert meta["general.file_type"] == 7  # MOSTLY_Q8_0
