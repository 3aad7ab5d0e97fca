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
from model.svg import line_chart


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


def loss_svg(records: list[dict]) -> str:
    """SVG text of the train loss (line) and, when there is one, the held-out loss (dots)."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    title = "loss: train (blue line)" + (", held-out (red dots)" if evals else "")
    return line_chart(train, evals, title, "optimizer step")


def write_loss_svg(records: list[dict], path: Path) -> None:
    atomic_write(path, loss_svg(records))
