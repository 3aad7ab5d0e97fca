"""Specs for model/llama.py: the forward pass, masks, generation and the config reader."""
import functools

import pytest
import torch

from model import Config, Transformer, load_pretrained
from model.errors import SFTError
from model.llama import rope_inv_freq
from model.sampling import sample

PROMPTS = [[1, 1721, 318, 575, 261, 631], [1, 400], [1, 50, 60, 70, 80, 90, 100, 110, 120]]


@functools.lru_cache(maxsize=None)
def _load(path):
    return load_pretrained(path)


@pytest.fixture
def pico(pico_dir):
    return _load(str(pico_dir))


def tiny_config(**kw) -> Config:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    return Config(**{**base, **kw})


def test_both_shared_models_load_and_return_logits_of_shape_b_t_v(pico, tiny_llama2_dir):
    tiny = _load(str(tiny_llama2_dir))
    for model in (pico, tiny):
        x = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
        logits = model(x)
        assert logits.shape == (2, 4, model.config.vocab_size)
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert tiny.config.num_key_value_heads == 2 and tiny.config.num_attention_heads == 4
    assert pico.lm_head.weight is pico.embed_tokens.weight  # tied
    assert tiny.lm_head.weight is not tiny.embed_tokens.weight


def test_return_hidden_then_lm_head_equals_logits(pico):
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(pico.lm_head(pico(x, return_hidden=True)), pico(x))


def test_cached_greedy_generation_equals_uncached_argmax_loop(pico):
    prompt = PROMPTS[0]
    new = pico.generate([prompt], max_new_tokens=16, stop_ids=())[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            seq.append(int(pico(torch.tensor([seq]))[0, -1].argmax()))
    assert new == seq[len(prompt):]


def test_batched_generation_of_different_length_prompts_equals_one_by_one(pico):
    batched = pico.generate(PROMPTS, max_new_tokens=10, stop_ids=())
    alone = [pico.generate([p], max_new_tokens=10, stop_ids=())[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(r) == 10 for r in batched)


def test_packed_row_of_two_samples_gives_same_logits_as_each_alone(pico):
    a, b = PROMPTS[0], PROMPTS[2]
    packed = torch.tensor([a + b])
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])  # RoPE restarts per sample
    seq = torch.tensor([[0] * len(a) + [1] * len(b)])
    with torch.no_grad():
        out = pico(packed, position_ids=pos, seq_ids=seq)
        la, lb = pico(torch.tensor([a])), pico(torch.tensor([b]))
    # Same math, other GEMM shapes: fp32 sums of 256-688 products in another order. Each of the
    # ~20 matmuls between input and logit may move a value by a few ulps (eps = 1.2e-7), so a
    # logit (|x| up to ~15) agrees to ~1e-6 relative: rtol 1e-5 (~80 ulps), atol 1e-5 near 0.
    torch.testing.assert_close(out[:, :len(a)], la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, len(a):], lb, atol=1e-5, rtol=1e-5)


def test_without_seq_ids_a_packed_row_leaks_across_samples(pico):
    a, b = PROMPTS[0], PROMPTS[2]
    with torch.no_grad():
        out = pico(torch.tensor([a + b]))
        lb = pico(torch.tensor([b]))
    assert (out[:, len(a):] - lb).abs().max() > 1e-2  # the mask above is what makes them equal


def test_generation_stops_on_any_stop_id_and_excludes_it(pico):
    free = pico.generate([PROMPTS[0]], max_new_tokens=12, stop_ids=())[0]
    stop = free[5]
    out = pico.generate([PROMPTS[0]], max_new_tokens=12, stop_ids=(99999, stop))[0]
    assert out == free[:free.index(stop)]


def test_stream_and_on_token_report_the_same_tokens_as_generate(pico):
    ref = pico.generate([PROMPTS[1]], max_new_tokens=10, stop_ids=())[0]
    assert list(pico.stream(PROMPTS[1], max_new_tokens=10, stop_ids=())) == ref
    seen = []
    pico.generate(PROMPTS[:2], max_new_tokens=10, stop_ids=(), on_token=lambda r, t: seen.append((r, t)))
    assert [t for r, t in seen if r == 1] == ref


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(pico):
    kw = dict(max_new_tokens=10, stop_ids=(), temperature=0.9, top_p=0.9)
    assert pico.generate(PROMPTS[:2], seed=3, **kw) == pico.generate(PROMPTS[:2], seed=3, **kw)
    greedy = pico.generate([PROMPTS[0]], max_new_tokens=10, stop_ids=())
    assert pico.generate([PROMPTS[0]], max_new_tokens=10, stop_ids=(), temperature=1.0,
                         top_k=1, seed=0) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, 1.0, 0, 0.7, g)) for _ in range(200)}
    assert picks == {0, 1}
    assert {int(sample(logits, 1.0, 0, 0.01, g)) for _ in range(50)} == {0}


def test_gqa_model_runs_in_bf16_with_cache():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).to(torch.bfloat16)
    out = model.generate([[1, 2, 3], [4]], max_new_tokens=5, stop_ids=())
    assert [len(r) for r in out] == [5, 5]


def test_config_reads_rope_parameters_and_legacy_rope_theta():
    hf = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=2)
    assert Config.from_hf({**hf, "rope_theta": 500000.0}).rope_theta == 500000.0
    assert Config.from_hf({**hf, "rope_parameters": {"rope_theta": 1234.0, "rope_type": "default"}}).rope_theta == 1234.0
    cfg = Config.from_hf({**hf, "rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert Config.from_hf(cfg.to_hf()) == cfg


def test_rope_scaling_linear_and_llama3_rescale_low_frequencies_only_for_llama3():
    base = tiny_config(head_dim=64, num_attention_heads=1, num_key_value_heads=1, rope_theta=500000.0)
    inv = rope_inv_freq(base)
    lin = rope_inv_freq(tiny_config(head_dim=64, num_attention_heads=1, num_key_value_heads=1,
                                    rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    torch.testing.assert_close(lin, inv / 4)
    l3 = rope_inv_freq(tiny_config(head_dim=64, num_attention_heads=1, num_key_value_heads=1, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    assert l3[0] == inv[0]  # highest frequency untouched
    torch.testing.assert_close(l3[-1], inv[-1] / 8)  # lowest frequency slowed by factor


def test_missing_config_key_names_the_source_and_key():
    with pytest.raises(SFTError, match=r"my/config.json.*'hidden_size'"):
        Config.from_hf({"vocab_size": 3}, source="my/config.json")
    with pytest.raises(SFTError, match=r"c.json: 'num_hidden_layers' must be int, got '2'"):
        Config.from_hf(dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers="2",
                            num_attention_heads=2), source="c.json")
    with pytest.raises(SFTError, match="rope scaling type 'yarn'"):
        Config.from_hf(dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, rope_scaling={"type": "yarn", "factor": 2.0}))


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_initialises_new_rows_to_the_mean(tied):
    model = Transformer(tiny_config(tie_word_embeddings=tied))
    old_emb, old_head = model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    model.resize_token_embeddings(100)
    assert model.config.vocab_size == 100 and model(torch.tensor([[99]])).shape == (1, 1, 100)
    torch.testing.assert_close(model.embed_tokens.weight[:97], old_emb)
    torch.testing.assert_close(model.embed_tokens.weight[97], old_emb.mean(0))
    torch.testing.assert_close(model.lm_head.weight[98], old_head.mean(0))
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
