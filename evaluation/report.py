"""Evaluation reports: one `eval.json`, a Markdown table and an SVG bar chart; compare two runs.

Every task returns a dict with a flat `metrics` mapping (name -> number) plus free-form
details (per-instruction tables, per-subject accuracy, judge verdicts). The report flattens the
metrics to `task.metric` keys, which is what the tables, the chart and `compare` line up on:

    {"model": ..., "tasks": {"ifeval": {"metrics": {"prompt_strict": 0.21, ...}, ...}}}
        -> {"ifeval.prompt_strict": 0.21, ...}

The SVG (model/svg.py, written by hand) draws the rates on one 0..1 axis and the held-out loss
on an axis of its own; a loss on the rates' axis would squash every accuracy bar to nothing.

Files are written atomically (model/files.py) so an interrupted run never leaves a half-written
`eval.json` that `compare` would later misread.
"""
from __future__ import annotations

import json
from pathlib import Path

from model.errors import SFTError
from model.files import atomic_write, read_json
from model.svg import bar_chart

# Metrics where a smaller number is the better result (used to label deltas).
LOWER_IS_BETTER = ("loss", "ppl", "flip_rate", "loss_rate")


def flat_metrics(result: dict) -> dict[str, float | int]:
    """{"tasks": {t: {"metrics": {m: v}}}} -> {"t.m": v}, in task order."""
    out = {}
    for task, res in result.get("tasks", {}).items():
        for name, value in res.get("metrics", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{task}.{name}"] = value
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def _is_fraction(key: str) -> bool:
    """Accuracies and rates are charted; losses, perplexities and counts (n_*) are not."""
    name = key.rsplit(".", 1)[-1]
    return name not in ("loss", "ppl") and not name.startswith("n_")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c) if isinstance(c, float) else str(c) for c in r) + " |")
    return "\n".join(lines)


def to_markdown(result: dict) -> str:
    """The headline metrics as one table, then each task's own detail tables if it has any."""
    parts = [f"# Evaluation of `{result.get('model', '?')}`"]
    if result.get("adapter"):
        parts.append(f"Adapter: `{result['adapter']}`")
    for note in result.get("notes", []):
        parts.append(f"> {note}")
    metrics = flat_metrics(result)
    parts.append(markdown_table(["metric", "value"], [[k, v] for k, v in metrics.items()]))
    for task, res in result.get("tasks", {}).items():
        for title, table in res.get("tables", {}).items():
            parts.append(f"## {task}: {title}\n\n" + markdown_table(table["header"], table["rows"]))
    return "\n\n".join(parts) + "\n"


def _is_loss(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "loss"


def chart_panels(keys: list[str], series: dict[str, list[float | None]], what: str) -> list:
    """Bar-chart panels (model/svg.py) of flat metrics: rates on a 0..1 axis, losses on their own
    axis (a loss of 3 on the rates' axis would squash every rate to nothing); counts and
    perplexities (exp of the loss) are left to the tables."""
    rates = [i for i, k in enumerate(keys) if _is_fraction(k)]
    losses = [i for i, k in enumerate(keys) if _is_loss(k)]
    panels = []
    for idx, title in ((rates, "accuracies and rates (0-1)"), (losses, "held-out loss (lower is better)")):
        if not idx:
            continue
        part = {name: [vals[i] for i in idx] for name, vals in series.items()}
        top = 1.0 if idx is rates else 1.1 * max(v for vals in part.values() for v in vals if v is not None)
        panels.append(([keys[i] for i in idx], part, what + title, top))
    return panels


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """eval.json + eval.md + eval.svg in `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md", "svg": out_dir / "eval.svg"}
    atomic_write(paths["json"], json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write(paths["md"], to_markdown(result))
    flat = flat_metrics(result)
    name = Path(str(result.get("model", "model"))).name
    atomic_write(paths["svg"], bar_chart(chart_panels(list(flat), {name: list(flat.values())}, "")))
    return paths


def load_result(path: str | Path) -> dict:
    """Read an eval.json, given the file or the folder holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    if not p.is_file():
        raise SFTError(f"{path}: no eval.json found; pass an eval output folder or its eval.json "
                       "(written by `python eval.py --model DIR --out DIR`)")
    result = read_json(p, "eval.json")
    if not isinstance(result, dict) or not isinstance(result.get("tasks"), dict):
        raise SFTError(f"{p}: no 'tasks' object; this is not an eval.json written by eval.py")
    return result


# Rates whose name starts with a prefix here are fractions of that count (IFEval's instructions,
# toolcall's call and text turns); any other rate is a fraction of n_prompts or n_items.
RATE_COUNTS = {"inst_": "n_instructions", "call_": "n_call_turns", "text_": "n_text_turns"}


def _count(key: str, flat: dict) -> int | None:
    """How many items a rate is a fraction of (RATE_COUNTS, else n_prompts / n_items)."""
    task, name = key.split(".", 1)
    names = [n for prefix, n in RATE_COUNTS.items() if name.startswith(prefix)] or ["n_prompts", "n_items"]
    return next((int(flat[f"{task}.{n}"]) for n in names if f"{task}.{n}" in flat), None)


def _within_noise(key: str, va: float, vb: float, fa: dict, fb: dict) -> bool:
    """|B-A| < 2 standard errors of a difference of two proportions (for 0..1 rates with a count).

    With 40 items an accuracy moves by ±0.15 by chance; calling that "better" would mislead.
    """
    na, nb = _count(key, fa), _count(key, fb)
    if not (_is_fraction(key) and na and nb and 0 <= va <= 1 and 0 <= vb <= 1):
        return False
    se = (va * (1 - va) / na + vb * (1 - vb) / nb) ** 0.5
    return abs(vb - va) < 2 * se


def compare_rows(a: dict, b: dict) -> list[list]:
    """[metric, A, B, B-A, verdict] for the union of both runs' metrics (A's order first).

    verdict: better / worse (direction-aware: lower loss is better), "~ (noise)" when a rate
    moved by less than two standard errors, "" when equal or one side is missing.
    """
    fa, fb = flat_metrics(a), flat_metrics(b)
    rows = []
    for key in list(fa) + [k for k in fb if k not in fa]:
        va, vb = fa.get(key), fb.get(key)
        delta = vb - va if va is not None and vb is not None else None
        verdict = ""
        if delta is not None and abs(delta) > 1e-12:
            better = delta < 0 if key.endswith(LOWER_IS_BETTER) else delta > 0
            verdict = "better" if better else "worse"
            if _within_noise(key, va, vb, fa, fb):
                verdict = "~ (noise)"
        rows.append([key, va, vb, delta, verdict])
    return rows


def compare_markdown(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    rows = compare_rows(a, b)
    head = f"# {name_a} vs {name_b}\n\nA = `{a.get('model')}`, B = `{b.get('model')}`" + \
        (f" + adapter `{b['adapter']}`" if b.get("adapter") else "") + "\n\n"
    return head + markdown_table(["metric", name_a, name_b, "delta (B-A)", "B is"], rows) + "\n"


def write_compare(a: dict, b: dict, out_dir: str | Path, name_a: str = "A", name_b: str = "B") -> dict:
    """compare.md + compare.json + compare.svg (grouped bars of the 0..1 metrics)."""
    out_dir = Path(out_dir)
    rows = compare_rows(a, b)
    paths = {"md": out_dir / "compare.md", "json": out_dir / "compare.json", "svg": out_dir / "compare.svg"}
    atomic_write(paths["md"], compare_markdown(a, b, name_a, name_b))
    atomic_write(paths["json"], json.dumps(
        [dict(zip(["metric", "a", "b", "delta", "b_is"], r)) for r in rows], indent=2) + "\n")
    series = {name_a: [r[1] for r in rows], name_b: [r[2] for r in rows]}
    atomic_write(paths["svg"], bar_chart(chart_panels([r[0] for r in rows], series, f"{name_a} vs {name_b}: ")))
    return paths
