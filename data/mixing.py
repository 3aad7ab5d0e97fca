"""Mixing several datasets: how much of each source the model sees.

With sources of sizes n_1..n_k we choose a share p_i of the mixture for each:

- weights w_i:        p_i = w_i / sum_j w_j          (e.g. 70% chat, 30% math)
- temperature T:      p_i = n_i^(1/T) / sum_j n_j^(1/T)
  T = 1 is proportional to size (plain concatenation); T -> infinity is uniform; T in between
  up-weights small sources without letting them dominate (the multilingual / multi-task recipe).

The mixture has `total` samples (default: the sum of the sources' sizes). Source i contributes
round(p_i * total) samples (largest remainder, so the counts add up exactly): whole passes over
the source when it is up-sampled, plus a random subset without repeats for the remainder.
Everything draws from one `random.Random(seed)` per source, seeded from (seed, source name),
so a mixture is the same on every run and machine, and adding a source does not change which
samples the others contribute. `mixture_take` gives those choices as indices (what a run needs:
the samples themselves stay in their memory-mapped arrays); `mix` applies them to lists. With
one source and no weights the mixture is the source itself, in its own order. The report says, per source, how many samples and tokens were
taken (and how many of the tokens are trained on) -- token shares, not sample shares, are what
the loss actually sees.
"""
from __future__ import annotations

import random
import zlib

from model.errors import SFTError
from model.loss import IGNORE_INDEX


def mixture_probabilities(sizes: dict[str, int], weights: dict[str, float] | None = None,
                          temperature: float | None = None) -> dict[str, float]:
    """p_i from explicit weights, or from sizes with temperature T (T=1 when neither is given)."""
    if weights is not None and temperature is not None:
        raise SFTError("give mixing weights or a temperature, not both")
    if weights is not None:
        missing = set(sizes) - set(weights)
        if missing or any(w < 0 for w in weights.values()) or sum(weights.get(k, 0) for k in sizes) <= 0:
            raise SFTError(f"mixing weights must be >= 0, sum > 0 and name every source (missing: {sorted(missing)})")
        raw = {k: float(weights[k]) for k in sizes}
    else:
        t = 1.0 if temperature is None else float(temperature)
        if t <= 0:
            raise SFTError(f"mixing temperature must be > 0, got {t}")
        raw = {k: n ** (1.0 / t) if n > 0 else 0.0 for k, n in sizes.items()}
    z = sum(raw.values())
    return {k: v / z for k, v in raw.items()}


def _counts(probs: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to `total`, nearest to p_i * total (largest remainder)."""
    exact = {k: p * total for k, p in probs.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def take(n_available: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices into n_available items: whole passes in order, then a random subset
    without repeats (in index order)."""
    passes, rest = divmod(count, n_available) if n_available else (0, count)
    return list(range(n_available)) * passes + sorted(rng.sample(range(n_available), rest))


def mixture_take(sizes: dict[str, int], weights: dict[str, float] | None = None, temperature: float | None = None,
                 total: int | None = None, seed: int = 0) -> tuple[dict[str, list[int]], dict[str, float]]:
    """For each source, the indices of the samples it contributes; and each source's p_i."""
    probs = mixture_probabilities(sizes, weights, temperature)
    counts = _counts(probs, sum(sizes.values()) if total is None else int(total))
    taken = {}
    for name, n in sizes.items():
        if counts[name] and not n:
            raise SFTError(f"mixing source {name!r} is empty but has probability {probs[name]:.3f}")
        taken[name] = take(n, counts[name], random.Random(zlib.crc32(f"{seed}:{name}".encode())))
    return taken, probs


def _tokens(sample) -> tuple[int, int]:
    if isinstance(sample, dict) and "input_ids" in sample:
        labels = sample.get("labels", sample["input_ids"])
        return len(sample["input_ids"]), sum(1 for l in labels if l != IGNORE_INDEX)
    return 0, 0


def mix(sources: dict[str, list], weights: dict[str, float] | None = None, temperature: float | None = None,
        total: int | None = None, seed: int = 0) -> tuple[list, dict]:
    """Shuffled mixture of the sources' samples and a per-source report.

    report[name] = {"available", "probability", "samples", "passes", "tokens", "trainable_tokens"}
    (token counts when samples are tokenized dicts; 0 otherwise).
    """
    if not sources:
        raise SFTError("mix() needs at least one source")
    taken, probs = mixture_take({k: len(v) for k, v in sources.items()}, weights, temperature, total, seed)
    mixed, report = [], {}
    for name, items in sources.items():
        chosen = [items[i] for i in taken[name]]
        tok = [_tokens(s) for s in chosen]
        report[name] = {"available": len(items), "probability": probs[name], "samples": len(chosen),
                        "passes": len(chosen) / max(len(items), 1), "tokens": sum(t for t, _ in tok),
                        "trainable_tokens": sum(t for _, t in tok)}
        mixed += chosen
    random.Random(seed).shuffle(mixed)
    return mixed, report


def format_report(report: dict) -> str:
    """A small table: per source samples and tokens taken, and their shares."""
    all_tok = sum(r["tokens"] for r in report.values()) or 1
    all_n = sum(r["samples"] for r in report.values()) or 1
    lines = [f"{'source':<24}{'avail':>8}{'p':>7}{'samples':>9}{'passes':>8}{'tokens':>10}{'tok %':>7}{'trained':>10}"]
    for name, r in report.items():
        lines.append(f"{name:<24}{r['available']:>8}{r['probability']:>7.3f}{r['samples']:>9}{r['passes']:>8.2f}"
                     f"{r['tokens']:>10}{100 * r['tokens'] / all_tok:>6.1f}%{r['trainable_tokens']:>10}")
    lines.append(f"{'total':<24}{'':>15}{all_n:>9}")
    return "\n".join(lines)
