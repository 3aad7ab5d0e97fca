"""Run metrics: one JSON object per line in metrics.jsonl, and a loss curve drawn as SVG.

metrics.jsonl is append-only and line-buffered, so a crash loses at most the line being
written and `tail -f` shows progress. Each line is a dict with a "kind": "train" lines carry
step, loss, lr, grad_norm, tokens_per_s, trainable_tokens; "eval" lines carry step, eval_loss,
eval_ppl. On resume from step N, lines written after N (by the run that crashed) are dropped,
so the file reads as if the run had never stopped.

The SVG is plain text: a <polyline> for the training loss, circles for the held-out loss,
and a few tick labels. Map a value v in [lo, hi] to a y pixel as
    y = top + (hi - v) / (hi - lo) * height
(SVG's y axis points down). No plotting library needed, and the file opens in any browser.
"""
from __future__ import annotations

import json
from pathlib import Path

from model.files import atomic_write, read_jsonl


class MetricsLog:
    """Appends dict records to <run_dir>/metrics.jsonl and keeps them for the plot."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.records: list[dict] = []
        # a line cut short by a crash is skipped; truncate_after then rewrites the file without it
        self.records = read_jsonl(self.path, "metrics log", resumable=True)
        self._file = open(self.path, "a", buffering=1)

    def truncate_after(self, step: int) -> None:
        """Forget lines past `step` (written by a run that stopped before its next checkpoint)."""
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        self._file.close()
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._file = open(self.path, "a", buffering=1)

    def reset(self) -> None:
        self.records = []
        self.truncate_after(-1)

    def log(self, **record) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def loss_svg(records: list[dict], width: int = 640, height: int = 360) -> str:
    """SVG text of train loss (line) and eval loss (dots) against the optimizer step."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    pts = train + evals
    pad_l, pad_r, pad_t, pad_b = 56, 16, 24, 40
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if pts:
        x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
        y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)
        x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1e-6)
        X = lambda s: pad_l + (s - x_lo) / (x_hi - x_lo) * w  # noqa: E731
        Y = lambda v: pad_t + (y_hi - v) / (y_hi - y_lo) * h  # noqa: E731
        for v in _ticks(y_lo, y_hi):  # horizontal grid + y labels
            out.append(f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" '
                       f'stroke="#ddd"/><text x="{pad_l - 4}" y="{Y(v) + 4:.1f}" '
                       f'text-anchor="end">{v:.3f}</text>')
        for s in _ticks(x_lo, x_hi):
            out.append(f'<text x="{X(s):.1f}" y="{pad_t + h + 16}" text-anchor="middle">'
                       f'{s:.0f}</text>')
        if train:
            line = " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in train)
            out.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        out += [f'<circle cx="{X(s):.1f}" cy="{Y(v):.1f}" r="3.5" fill="#d62728"/>' for s, v in evals]
    out.append(f'<text x="{pad_l + w / 2}" y="{height - 6}" text-anchor="middle">optimizer step'
               f'</text><text x="{pad_l}" y="14">loss: train (blue line), held-out (red dots)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_loss_svg(records: list[dict], path: Path) -> None:
    atomic_write(path, loss_svg(records))
