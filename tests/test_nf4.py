"""NF4 + double quantization (model/nf4.py): the code book, the error bound, the storage cost,
and a 4-bit linear whose backward recomputes the weight instead of keeping it."""
import torch
import torch.nn.functional as F

from model.nf4 import (DYNAMIC_CODE, NF4_CODE, Linear4bit, dequantize_nf4, double_dequantize,
                       double_quantize, load_quantized, nf4_bits_per_param, quantize_model_linears,
                       quantize_nf4)

HALF_MAX_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2)


def test_nf4_levels_are_normalised_normal_quantiles():
    # 8 quantiles on the positive side, 7 on the negative side, an exact zero, scaled to [-1, 1]
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    levels = levels / levels.max()
    assert torch.allclose(levels.float(), NF4_CODE, atol=1e-6)
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1


def test_dynamic_map_has_256_sorted_levels_with_zero_and_one():
    assert DYNAMIC_CODE.numel() == 256 and torch.all(DYNAMIC_CODE[1:] > DYNAMIC_CODE[:-1])
    assert 0.0 in DYNAMIC_CODE and DYNAMIC_CODE.max() == 1.0


def test_first_value_of_a_pair_is_stored_in_the_high_nibble():
    w = NF4_CODE[[15, 0, 7, 9]].clone()        # indices 15, 0, 7, 9 in one block
    packed, absmax = quantize_nf4(w)
    assert packed.tolist() == [0xF0, 0x79] and absmax.tolist() == [1.0]


def test_round_trip_error_per_block_is_at_most_half_the_largest_gap():
    torch.manual_seed(0)
    w = torch.randn(96, 160) * 0.02
    w[3, 5] = 0.5                                             # an outlier only hurts its own block
    packed, absmax = quantize_nf4(w)
    err = (dequantize_nf4(packed, absmax, w.shape) - w).abs().view(-1, 64).amax(1)
    assert torch.all(err <= absmax * HALF_MAX_GAP * (1 + 1e-6))
    # with double quantization the scale itself moves a little: the bound grows by that error
    q, scale, offset = double_quantize(absmax)
    absmax_dq = double_dequantize(q, scale, offset)
    err_dq = (dequantize_nf4(packed, absmax_dq, w.shape) - w).abs().view(-1, 64).amax(1)
    assert torch.all(err_dq <= absmax * HALF_MAX_GAP + (absmax - absmax_dq).abs() + 1e-7)
    assert (absmax - absmax_dq).abs().max() < 0.01 * absmax.max()


def test_partial_last_block_and_odd_length_round_trip():
    w = torch.linspace(-1, 1, 64 + 7)
    packed, absmax = quantize_nf4(w)
    assert packed.numel() == 36 and absmax.numel() == 2
    err = (dequantize_nf4(packed, absmax, w.shape) - w).abs()
    assert err.max() <= HALF_MAX_GAP + 1e-6


def test_double_quantization_costs_4_127_bits_per_parameter():
    w = torch.randn(1024, 4096) * 0.02
    assert abs(Linear4bit(w, double_quant=False).storage_bits() / w.numel() - 4.5) < 1e-3
    bits = Linear4bit(w, double_quant=True).storage_bits() / w.numel()
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4       # 4.127


def test_linear4bit_forward_and_input_grad_match_a_dense_reference():
    torch.manual_seed(0)
    w, b = torch.randn(48, 128) * 0.05, torch.randn(48)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        layer = Linear4bit(w, b, compute_dtype=dtype)
        dense = layer.dequantize(dtype)
        x1 = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_(True)
        y1, y2 = layer(x1), F.linear(x2, dense, b.to(dtype))
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        assert y1.dtype == dtype
        assert torch.allclose(y1.float(), y2.float(), atol=tol, rtol=tol)
        assert torch.allclose(x1.grad.float(), x2.grad.float(), atol=tol, rtol=tol)


def test_linear4bit_backward_keeps_no_dequantized_weight():
    layer = Linear4bit(torch.randn(256, 512) * 0.02)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    x = torch.randn(4, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved, "the hook saw nothing: the test would prove nothing"
    assert all(dtype == torch.uint8 for dtype, _ in saved), saved
    assert all(shape != (256, 512) for _, shape in saved)
    y.sum().backward()
    assert x.grad is not None and not any(p.requires_grad for p in layer.parameters())


def test_casting_the_model_to_bf16_does_not_round_the_scales():
    layer = Linear4bit(torch.randn(64, 256))
    before = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)
    assert torch.equal(layer.dequantize(torch.float32), before)


def test_quantize_model_linears_skips_the_head():
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(64, 64))
    net.add_module("lm_head", torch.nn.Linear(64, 10))
    quantize_model_linears(net)
    assert isinstance(net.proj, Linear4bit) and isinstance(net.lm_head, torch.nn.Linear)


def test_load_quantized_pico_is_close_to_full_precision(pico_dir):
    from model import load_pretrained
    full = load_pretrained(pico_dir)
    q = load_quantized(pico_dir, compute_dtype=torch.float32)
    assert isinstance(q.layers[0].mlp.down_proj, Linear4bit)
    assert abs(nf4_bits_per_param(q) - 4.127) < 0.01
    x = torch.randint(0, full.config.vocab_size, (2, 24))
    with torch.no_grad():
        p, pq = full(x).log_softmax(-1), q(x).log_softmax(-1)
    kl = (p.exp() * (p - pq)).sum(-1).mean()
    assert kl < 0.1, f"NF4 changed the next-token distribution too much: KL {kl:.3f}"
