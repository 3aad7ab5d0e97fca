"""data.mixing: deterministic weighted / temperature mixtures with a per-source token report."""
import pytest

from data.mixing import format_report, mix, mixture_probabilities
from model.errors import SFTError


def tokenized(name, n, length):
    return [{"input_ids": [k] * length, "labels": [-100] + [k] * (length - 1), "src": name} for k in range(n)]


SOURCES = {"chat": tokenized("chat", 900, 10), "math": tokenized("math", 100, 30)}


def test_temperature_one_is_proportional_and_large_temperature_is_uniform():
    sizes = {"a": 900, "b": 100}
    assert mixture_probabilities(sizes) == pytest.approx({"a": 0.9, "b": 0.1})
    assert mixture_probabilities(sizes, temperature=2.0) == pytest.approx({"a": 30 / 40, "b": 10 / 40})
    assert mixture_probabilities(sizes, temperature=1e9) == pytest.approx({"a": 0.5, "b": 0.5})
    assert mixture_probabilities(sizes, weights={"a": 1, "b": 3}) == pytest.approx({"a": 0.25, "b": 0.75})


def test_weighted_mix_takes_the_right_counts_and_reports_tokens():
    mixed, report = mix(SOURCES, weights={"chat": 0.5, "math": 0.5}, total=400, seed=1)
    assert len(mixed) == 400
    assert sum(s["src"] == "math" for s in mixed) == 200 == report["math"]["samples"]
    assert report["math"]["tokens"] == 200 * 30 and report["math"]["trainable_tokens"] == 200 * 29
    assert report["chat"]["tokens"] == 200 * 10
    assert report["math"]["passes"] == 2.0  # up-sampled: every math sample exactly twice
    ids = [s["input_ids"][0] for s in mixed if s["src"] == "math"]
    assert sorted(ids) == sorted(list(range(100)) * 2)
    assert "math" in format_report(report)


def test_mixing_is_deterministic_for_a_seed_and_changes_with_it():
    a, _ = mix(SOURCES, temperature=2.0, seed=7)
    b, _ = mix(SOURCES, temperature=2.0, seed=7)
    c, _ = mix(SOURCES, temperature=2.0, seed=8)
    assert a == b and a != c
    assert len(a) == 1000


def test_counts_add_up_exactly_and_subsampling_never_repeats():
    mixed, report = mix({"x": list(range(10)), "y": list(range(100, 107)), "z": list(range(200, 203))},
                        weights={"x": 1, "y": 1, "z": 1}, total=10, seed=0)
    assert len(mixed) == 10 and sum(r["samples"] for r in report.values()) == 10
    assert len(set(mixed)) == 10


def test_bad_mixing_settings_are_errors():
    with pytest.raises(SFTError, match="missing"):
        mix(SOURCES, weights={"chat": 1})
    with pytest.raises(SFTError, match="not both"):
        mix(SOURCES, weights={"chat": 1, "math": 1}, temperature=2)
    with pytest.raises(SFTError, match="temperature must be > 0"):
        mix(SOURCES, temperature=0)
