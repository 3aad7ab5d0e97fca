"""The speed/memory work of model/speedups.py changes nothing but speed and memory.

Its RMSNorm and SwiGLU keep fewer tensors for backward and write their backward by hand; a sign
or a missing term there would train a subtly wrong model without any error, so the hand-written
gradients are checked numerically (gradcheck, float64) and the forwards against the op-by-op
formulas in fp32 and bf16. A model with `speedups.apply` gives the plain model's gradients bit
for bit (oneDNN off) or within fp32 summation-order rounding (oneDNN on).
"""
import pytest
import torch
import torch.nn.functional as F

from model import speedups
from model.matmul import TORCH, set_routing
from model.speedups import _RMSNormFn, _SwiGLUFn


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
    assert torch.autograd.gradcheck(lambda a, b: _SwiGLUFn.apply(a, b, []), (a, b))


def test_forwards_equal_the_op_by_op_formulas_in_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 16, 64).to(dtype)
        w = (1 + 0.1 * torch.randn(64)).to(dtype)
        assert torch.equal(_RMSNormFn.apply(x, w, 1e-5), reference_rmsnorm(x, w, 1e-5))
        a, b = torch.randn(4, 16, 32).to(dtype), torch.randn(4, 16, 32).to(dtype)
        assert torch.equal(_SwiGLUFn.apply(a, b, []), F.silu(a) * b)


def test_frozen_norm_weight_gets_no_gradient_but_input_does():
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.ones(8)  # frozen, as under LoRA
    _RMSNormFn.apply(x, w, 1e-5).sum().backward()
    assert x.grad is not None and w.grad is None


# --------------------------------------------------------------------------- model/recompute.py

FAMILY_FLAGS = {"llama": {}, "qwen2": {}, "qwen3": {"head_dim": 16},  # qwen3: 4 x 16 != 32
                "mistral": {"sliding_window": 4}}                     # rows of 10 cross it


def _tiny_model(seed=0, family="llama"):
    from model.llama import Config, Transformer
    torch.manual_seed(seed)
    model = Transformer(Config.for_family(family, vocab_size=96, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, **FAMILY_FLAGS[family]))
    with torch.no_grad():  # q/k/v biases and q/k norm weights away from their 0 / 1 init
        for name, p in model.named_parameters():
            if name.endswith(("bias", "q_norm.weight", "k_norm.weight")):
                p.add_(torch.randn(p.shape) * 0.3)
    return model


def _lean(model, **switches):
    speedups.apply(model, onednn=False, **switches)
    return model


def _grads(model, recompute: bool, retain: bool = False):
    from model.loss import masked_ce_sum
    for layer in model.layers:
        layer.recompute = recompute
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same LoRA dropout masks in both runs
    loss, _ = masked_ce_sum(model, model(ids, return_hidden=True), ids)
    loss.backward(retain_graph=retain)
    if retain:  # a second backward unpacks every saved tensor again: recomputed again
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", list(FAMILY_FLAGS))
def test_recomputed_activations_give_bit_identical_gradients(family):
    import lora
    from model.nf4 import quantize_model_linears
    full = _lean(_tiny_model(family=family))
    with_lora = _lean(lora.apply_lora(_tiny_model(family=family), r=4, targets="all-linear", dropout=0.1))
    qlora = _lean(lora.apply_lora(quantize_model_linears(_tiny_model(family=family)), r=4, targets="all-linear"))
    for model in (full, with_lora, qlora):
        for retain in (False, True):
            kept, recomputed = _grads(model, False, retain), _grads(model, True, retain)
            assert kept.keys() == recomputed.keys() and kept
            for name in kept:
                assert torch.equal(kept[name], recomputed[name]), name


def test_norm_and_swiglu_outputs_are_not_kept_for_backward():
    """The graph must not hold the RMSNorm / SwiGLU outputs (weakly referenced here) alive."""
    import gc
    import weakref
    for recompute in (False, True):
        model = _lean(_tiny_model())
        refs = []
        for layer in model.layers:
            layer.recompute = recompute
            for mod in (layer.input_layernorm, layer.post_attention_layernorm):
                mod.register_forward_hook(lambda m, i, out: refs.append(weakref.ref(out)))
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, i: refs.append(weakref.ref(i[0])))
        loss = model(torch.randint(0, 96, (2, 8)), return_hidden=True).sum()
        gc.collect()
        alive = sum(r() is not None for r in refs)
        # 4 norm outputs and 2 SwiGLU outputs; recomputed ones are gone, kept ones live on
        assert len(refs) == 6 and alive == (0 if recompute else 6), (recompute, alive)
        loss.backward()


def test_backward_computes_silu_once_per_layer():
    """With recomputation, down_proj's recomputed input hands silu(a) to the SwiGLU backward:
    one silu per layer in backward (the recipe), not two."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSilu(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountSilu.n += func is torch.ops.aten.silu.default
            return func(*args, **(kwargs or {}))

    for recompute, per_layer in ((True, 1), (False, 1)):  # kept: backward recomputes it itself
        model = _lean(_tiny_model(), recompute=recompute)
        loss = model(torch.randint(0, 96, (2, 8)), return_hidden=True).sum()
        CountSilu.n = 0
        with CountSilu():
            loss.backward()
        assert CountSilu.n == per_layer * len(model.layers), (recompute, CountSilu.n)


@pytest.mark.parametrize("family", list(FAMILY_FLAGS))
def test_speedups_give_the_plain_models_gradients(family):
    """apply() swaps classes in place (the q/k norms of qwen3 too): same parameters, same
    gradients. Recomputation alone is bit-exact; the hand-written backward and oneDNN products
    round differently (fp32 sums in another order), so those are compared at fp32 tolerance:
    |a - b| <= 1e-5 |b| + 1e-6."""
    import lora
    from model.speedups import LeanRMSNorm
    for make in (lambda: _tiny_model(family=family),
                 lambda: lora.apply_lora(_tiny_model(family=family), r=4, targets="all-linear")):
        plain = _grads(make(), recompute=False)
        recomputed = _grads(_lean(make(), lean_backward=False), recompute=True)
        assert plain.keys() == recomputed.keys()
        for name in plain:
            assert torch.equal(plain[name], recomputed[name]), name
        for onednn in (True, "auto"):  # every product through oneDNN, and this machine's choice
            applied = make()
            state = speedups.apply(applied, onednn=onednn)
            try:
                fast = _grads(applied, recompute=True)
            finally:
                set_routing(TORCH)
            for name in plain:
                torch.testing.assert_close(fast[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
            assert state.lean_backward and state.recompute
            if family == "qwen3":
                assert type(applied.layers[0].self_attn.q_norm) is LeanRMSNorm


# --------------------------------------------------------------------------- train.compile

def test_compiled_blocks_are_plain_and_give_the_eager_gradients():
    """train.compile: speedups.apply(compiled=True) leaves the blocks plain (inductor fuses and
    recomputes by itself), and the compiled blocks train like eager ones (fp32 rounding apart:
    inductor sums the norms' reductions in its own order)."""
    from training.distributed import shard_model
    eager, compiled = _tiny_model(), _tiny_model()
    applied = speedups.apply(compiled, onednn=False, compiled=True)
    assert not applied.lean_backward and not applied.recompute
    assert not any(isinstance(m, (speedups.LeanDecoderLayer, speedups.LeanRMSNorm))
                   for m in compiled.modules())
    shard_model(compiled, mixed_precision=False, compile=True)
    want, got = _grads(eager, recompute=False), _grads(compiled, recompute=False)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compile_without_a_cpp_compiler_is_one_line_before_any_work(monkeypatch, tmp_path):
    import training.loop
    from model.errors import SFTError
    from training.config import load_config
    cfg = load_config("configs/quickstart.toml", ["train.compile=true", f"run.out_dir={tmp_path}"])
    monkeypatch.setattr(training.loop.shutil, "which", lambda name: None)
    with pytest.raises(SFTError, match=r"^config: train.compile=true on the CPU needs a C\+\+ compiler"):
        training.loop.setup(cfg)
    assert not any(tmp_path.iterdir())  # nothing written
