"""The demo's measurement: does fine-tuning make the base model follow held-out instructions?

The same model object is scored twice on the same held-out items (data/backtranslate.py
`heldout_items`: topics, task sentences, constraint wordings and open-ended values that no
training pair used): once before the first optimizer step -- with LoRA's B = 0 the adapted model
IS the base model -- and once after the last. Both go through evaluation/ifeval.py (greedy
generation with the run's chat template, then the `data.constraints` checkers), so the demo has
no scorer of its own.

    pass rate = prompts whose every instruction passes the strict checker / prompts

The report is a before/after table per constraint type, an SVG of the same bars
(evaluation/report.py's chart), `demo.json` with every response, and, last, one JSON line:
{"base_pass_rate", "tuned_pass_rate", "delta", "n_items", "seconds", "chart"}.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from data.chat import Chat
from evaluation.generation import EvalModel
from evaluation.ifeval import evaluate_ifeval
from model.files import atomic_write
from model.svg import bar_chart


def constraint_eval(model: torch.nn.Module, chat: Chat, items_path: str | Path, max_new_tokens: int,
                    batch_size: int = 50) -> dict:
    """IFEval-scored greedy answers of `model` (left in the train/eval mode it came in)."""
    em = EvalModel(model, chat, folder=str(items_path))
    return evaluate_ifeval(em, items_path, max_new_tokens=max_new_tokens, batch_size=batch_size)


def before_after_table(base: dict, tuned: dict) -> str:
    """Aligned text: one row per constraint type (strict pass rate), then the overall row."""
    b, t = base["per_type"], tuned["per_type"]
    w = max(len(k) for k in b)
    lines = [f"{'constraint (held-out)':<{w}}  {'n':>3}  {'base':>5}  {'tuned':>5}"]
    lines += [f"{k:<{w}}  {b[k]['n']:>3}  {b[k]['strict']:>5.2f}  {t[k]['strict']:>5.2f}" for k in b]
    bm, tm = base["metrics"], tuned["metrics"]
    lines.append(f"{'all (prompt-level strict)':<{w}}  {bm['n_prompts']:>3}  "
                 f"{bm['prompt_strict']:>5.2f}  {tm['prompt_strict']:>5.2f}")
    return "\n".join(lines)


def write_demo_report(base: dict, tuned: dict, run_dir: str | Path, seconds: float) -> dict:
    """Print the table, write demo.svg and demo.json into the run folder; return the JSON line's dict."""
    run_dir = Path(run_dir)
    print(before_after_table(base, tuned))
    b, t = base["per_type"], tuned["per_type"]
    chart = bar_chart([(list(b) + ["all"],
                        {"base": [b[k]["strict"] for k in b] + [base["metrics"]["prompt_strict"]],
                         "tuned": [t[k]["strict"] for k in b] + [tuned["metrics"]["prompt_strict"]]},
                        "held-out constraint pass rate (strict), before vs after LoRA", 1.0)])
    atomic_write(run_dir / "demo.svg", chart)
    atomic_write(run_dir / "demo.json", json.dumps({"base": base, "tuned": tuned}, indent=1,
                                                   ensure_ascii=False) + "\n")
    line = {"base_pass_rate": round(base["metrics"]["prompt_strict"], 4),
            "tuned_pass_rate": round(tuned["metrics"]["prompt_strict"], 4),
            "delta": round(tuned["metrics"]["prompt_strict"] - base["metrics"]["prompt_strict"], 4),
            "n_items": base["metrics"]["n_prompts"], "seconds": round(seconds, 1),
            "chart": str(run_dir / "demo.svg")}
    print(f"chart: {run_dir / 'demo.svg'}; responses: {run_dir / 'demo.json'}")
    print(json.dumps(line))
    return line
