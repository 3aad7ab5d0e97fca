"""The memory-saving autograd Functions compute the same values and gradients as plain autograd.

model/llama.py's RMSNorm and SwiGLU keep fewer tensors for backward and write their backward by
hand; a sign or a missing term there would train a subtly wrong model without any error, so the
hand-written gradients are checked numerically (gradcheck, float64) and the forwards against
the op-by-op formulas in fp32 and bf16.
"""
import torch
import torch.nn.functional as F

from model.llama import _RMSNormFn, _SwiGLUFn


def reference_rmsnorm(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def test_rmsnorm_function_has_exact_gradients():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-5), (x, w))


def test_swiglu_function_has_exact_gradients():
    a = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUFn.apply, (a, b))


def test_forwards_equal_the_op_by_op_formulas_in_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 16, 64).to(dtype)
        w = (1 + 0.1 * torch.randn(64)).to(dtype)
        assert torch.equal(_RMSNormFn.apply(x, w, 1e-5), reference_rmsnorm(x, w, 1e-5))
        a, b = torch.randn(4, 16, 32).to(dtype), torch.randn(4, 16, 32).to(dtype)
        assert torch.equal(_SwiGLUFn.apply(a, b), F.silu(a) * b)


def test_frozen_norm_weight_gets_no_gradient_but_input_does():
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.ones(8)  # frozen, as under LoRA
    _RMSNormFn.apply(x, w, 1e-5).sum().backward()
    assert x.grad is not None and w.grad is None
