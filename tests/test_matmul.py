"""model/matmul.py: each product of a linear layer on either library gives torch's result, and
the per-machine choice between them is measured, cached, and never trusted blindly.

oneDNN and MKL sum in different orders, so results agree to fp32 rounding: a sum of K products
of values ~1 carries ~sqrt(K) * 2^-24 relative error each way; with K <= 64 here,
|a - b| <= 1e-5 |b| + 1e-5 is a loose enough bound that only a wrong formula breaks it.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from model import matmul
from model.matmul import ONEDNN, TORCH, Routing

needs_onednn = pytest.mark.skipif(not matmul.onednn_available(), reason="no working oneDNN here")


@pytest.fixture
def routing():
    """Set a routing for one test; torch's default afterwards."""
    yield matmul.set_routing
    matmul.set_routing(TORCH)


@pytest.mark.parametrize("lib", [TORCH, pytest.param(ONEDNN, marks=needs_onednn)], ids=["torch", "onednn"])
@pytest.mark.parametrize("n_in,n_out", [(24, 40), (40, 24)])  # weight_grad's two orientations
def test_each_product_gives_torchs_result_on_either_library(routing, lib, n_in, n_out):
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(64, n_in, generator=g), torch.randn(n_out, n_in, generator=g), torch.randn(64, n_out, generator=g)
    assert routing(lib) == lib
    for got, want in ((matmul.forward_mm(x, w), x @ w.t()), (matmul.input_grad_mm(dy, w), dy @ w),
                      (matmul.weight_grad(dy, x), dy.t() @ x)):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_linear_with_mixed_routing_has_autograds_gradients(routing):
    routing(Routing(forward="onednn", input_grad="torch", weight_grad="onednn"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 8, generator=g)
    matmul.linear(x, w).backward(dy)
    got = (x.grad, w.grad)
    x.grad = w.grad = None
    F.linear(x, w).backward(dy)
    for a, b in zip(got, (x.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_onednn_is_chosen_only_where_clearly_faster():
    # speedup = MKL's time / oneDNN's; near-ties keep torch's default
    assert matmul.routing_from({"forward": 2.0, "input_grad": 1.1, "weight_grad": 0.7}) == \
        Routing(forward="onednn", input_grad="torch", weight_grad="torch")


@pytest.fixture
def fresh_calibration(tmp_path, monkeypatch):
    """calibrate() with the cache under tmp_path, an idle machine, and measure_products counted."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(matmul, "onednn_available", lambda: True)
    monkeypatch.setattr(matmul.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(matmul, "_calibrated", {})
    calls = []

    def measure():
        calls.append(1)
        return {"forward": 2.0, "input_grad": 1.0, "weight_grad": 1.5}
    monkeypatch.setattr(matmul, "measure_products", measure)
    return calls


def test_calibration_is_measured_once_then_read_from_the_cache(fresh_calibration, monkeypatch):
    want = Routing(forward="onednn", input_grad="torch", weight_grad="onednn")
    assert matmul.calibrate() == want and len(fresh_calibration) == 1
    assert matmul.calibrate() == want and len(fresh_calibration) == 1  # this process: remembered
    monkeypatch.setattr(matmul, "_calibrated", {})                    # a new process: the file
    assert matmul.calibrate() == want and len(fresh_calibration) == 1
    cache = json.loads(matmul.cache_file().read_text())
    assert cache[matmul.machine_key()]["routing"] == {"forward": "onednn", "input_grad": "torch",
                                                      "weight_grad": "onednn"}


@pytest.mark.parametrize("content", ["{torn", '{"KEY": {"routing": {"forward": "cublas"}}}', "[1, 2]",
                                     '{"KEY": {"routing": {"forward": "onednn", "gpu": "torch"}}}'])
def test_a_broken_or_foreign_cache_entry_is_measured_again(fresh_calibration, content):
    path = matmul.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(content.replace("KEY", matmul.machine_key()))
    assert matmul.calibrate() == Routing(forward="onednn", input_grad="torch", weight_grad="onednn")
    assert len(fresh_calibration) == 1
    assert matmul.machine_key() in json.loads(path.read_text())  # and the entry is rewritten


def test_a_measurement_on_a_busy_machine_is_used_but_not_cached(fresh_calibration, monkeypatch):
    monkeypatch.setattr(matmul.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    assert matmul.calibrate().forward == "onednn"
    assert not matmul.cache_file().exists()


def test_the_cache_key_names_the_library_caps(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = matmul.machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert matmul.machine_key() != plain and "ONEDNN_MAX_CPU_ISA=AVX2" in matmul.machine_key()
