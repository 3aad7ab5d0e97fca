"""Evaluation reports: one `eval.json`, a Markdown table and an SVG bar chart; compare two runs.

Every task returns a dict with a flat `metrics` mapping (name -> number) plus free-form
details (per-instruction tables, per-subject accuracy, judge verdicts). The report flattens the
metrics to `task.metric` keys, which is what the tables, the chart and `compare` line up on:

    {"model": ..., "tasks": {"ifeval": {"metrics": {"prompt_strict": 0.21, ...}, ...}}}
        -> {"ifeval.prompt_strict": 0.21, ...}

The SVG is written by hand (a few <rect>/<text> elements) so the project needs no plotting
library. Only metrics that live in [0, 1] (accuracies and rates) are drawn, on one shared axis;
a loss or a perplexity on the same axis would squash every accuracy bar to nothing.

Files are written atomically (temp file in the same folder, then `os.replace`) so an
interrupted run never leaves a half-written `eval.json` that `compare` would later misread.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

from model.errors import SFTError
from model.files import atomic_write

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


def svg_bar_chart(labels: list[str], series: dict[str, list[float | None]], title: str) -> str:
    """Grouped horizontal bars on a 0..1 axis: one group per label, one bar per series."""
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    bar_h, gap, left, width = 14, 10, 230, 360
    group_h = bar_h * len(series) + gap
    height = 40 + group_h * len(labels) + 20 * len(series) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           f'<text x="10" y="20" font-size="14">{escape(title)}</text>']
    for i, label in enumerate(labels):
        y0 = 35 + i * group_h
        out.append(f'<text x="{left - 6}" y="{y0 + group_h / 2}" text-anchor="end">{escape(label)}</text>')
        for j, (name, values) in enumerate(series.items()):
            v = values[i]
            if v is None:
                continue
            w = max(0.0, min(1.0, v)) * width
            y = y0 + j * bar_h
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                       f'fill="{colors[j % len(colors)]}"/>')
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 4}">{v:.3f}</text>')
    y = 35 + len(labels) * group_h + 5
    out.append(f'<line x1="{left}" y1="30" x2="{left}" y2="{y - 5}" stroke="#333"/>')
    for j, name in enumerate(series):
        out.append(f'<rect x="{left}" y="{y + 20 * j}" width="12" height="12" fill="{colors[j % len(colors)]}"/>')
        out.append(f'<text x="{left + 18}" y="{y + 20 * j + 11}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """eval.json + eval.md + eval.svg in `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md", "svg": out_dir / "eval.svg"}
    atomic_write(paths["json"], json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write(paths["md"], to_markdown(result))
    fr = {k: v for k, v in flat_metrics(result).items() if _is_fraction(k)}
    chart = svg_bar_chart(list(fr), {Path(str(result.get("model", "model"))).name: list(fr.values())},
                          "accuracies and rates (0-1)")
    atomic_write(paths["svg"], chart)
    return paths


def load_result(path: str | Path) -> dict:
    """Read an eval.json, given the file or the folder holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    if not p.is_file():
        raise SFTError(f"{path}: no eval.json found; pass an eval output folder or its eval.json "
                       "(written by `python eval.py --model DIR --out DIR`)")
    try:
        result = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SFTError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); re-run the evaluation") from None
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
    frac = [r for r in rows if _is_fraction(r[0])]
    chart = svg_bar_chart([r[0] for r in frac], {name_a: [r[1] for r in frac], name_b: [r[2] for r in frac]},
                          f"{name_a} vs {name_b}: accuracies and rates (0-1)")
    atomic_write(paths["svg"], chart)
    return paths
