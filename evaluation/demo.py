"""The demo's measurement: does fine-tuning make the base model follow held-out instructions?

The same model object is scored twice on the same held-out items (data/backtranslate.py
`heldout_items`: topics, task sentences, constraint wordings and open-ended values that no
training pair used): once before the first optimizer step -- with LoRA's B = 0 the adapted model
IS the base model -- and once after the last. Both runs go through evaluation/ifeval.py
(greedy generation with the run's chat template, then the `data.constraints` checkers), so the
demo has no scorer of its own.

    pass rate = prompts whose every instruction passes the strict checker / prompts

The report is a before/after table per constraint type, an SVG of the same bars
(evaluation/report.py's chart), `demo.json` with every response, and, last, one JSON line:
{"base_pass_rate", "tuned_pass_rate", "delta", "n_items", "seconds"}.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from data.backtranslate import build_demo_data

from evaluation.generation import EvalModel
from evaluation.ifeval import evaluate_ifeval
from evaluation.report import svg_bar_chart
from model.files import atomic_write


def constraint_eval(model: torch.nn.Module, tok, template: str, items_path: str | Path,
                    max_new_tokens: int, batch_size: int = 64) -> dict:
    """IFEval-scored greedy answers of `model` (left in the train/eval mode it came in)."""
    was_training = model.training
    model.eval()
    em = EvalModel(model, tok, template, folder=str(items_path))
    result = evaluate_ifeval(em, items_path, max_new_tokens=max_new_tokens, batch_size=batch_size)
    model.train(was_training)
    return result


def _per_type(result: dict) -> dict[str, float]:
    return {row[0]: row[2] for row in result["tables"]["per instruction type"]["rows"]}


def before_after_table(base: dict, tuned: dict) -> str:
    """Aligned text: one row per constraint type (strict pass rate), then the overall row."""
    b, t = _per_type(base), _per_type(tuned)
    n = {row[0]: row[1] for row in base["tables"]["per instruction type"]["rows"]}
    w = max(len(k) for k in b)
    lines = [f"{'constraint (held-out)':<{w}}  {'n':>3}  {'base':>5}  {'tuned':>5}"]
    lines += [f"{k:<{w}}  {n[k]:>3}  {b[k]:>5.2f}  {t.get(k, 0.0):>5.2f}" for k in b]
    bm, tm = base["metrics"], tuned["metrics"]
    lines.append(f"{'all (prompt-level strict)':<{w}}  {bm['n_prompts']:>3}  "
                 f"{bm['prompt_strict']:>5.2f}  {tm['prompt_strict']:>5.2f}")
    return "\n".join(lines)


def write_demo_report(base: dict, tuned: dict, run_dir: str | Path, seconds: float) -> dict:
    """Print the table, write demo.svg and demo.json into the run folder; return the JSON line's dict."""
    run_dir = Path(run_dir)
    print(before_after_table(base, tuned))
    b, t = _per_type(base), _per_type(tuned)
    labels = list(b) + ["all"]
    chart = svg_bar_chart(labels, {"base": [b[k] for k in b] + [base["metrics"]["prompt_strict"]],
                                   "tuned": [t.get(k, 0.0) for k in b] + [tuned["metrics"]["prompt_strict"]]},
                          "held-out constraint pass rate (strict), before vs after LoRA")
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


# ---- the three calls train.py makes when [demo] backtranslate = true ----

def prepare_data(cfg, tok, log=print) -> Path:
    """Build the training set + held-out items in <out_dir>/<name>-data/ and point data.train at it.

    A sibling of the run folder, because the run folder is (re)created only after the data is read.
    """
    d = cfg.demo
    train, held = build_demo_data(cfg.model.path, tok, Path(cfg.run.out_dir) / f"{cfg.run.name}-data",
                                  mix=d.mix, mix_records=d.mix_records, per_topic=d.texts_per_topic,
                                  per_text=d.pairs_per_text, heldout_per_type=d.heldout_per_type,
                                  seed=cfg.run.seed, ids=list(d.constraints) or None, log=log)
    cfg.data.train = str(train)
    return held


def score_base(model, tok, template: str, held: Path, cfg, log=print) -> dict:
    """Held-out pass rate before the first step (LoRA B = 0: the base model itself)."""
    t = time.perf_counter()
    result = constraint_eval(model, tok, template, held, cfg.demo.max_new_tokens)
    log(f"held-out constraints before: pass rate {result['metrics']['prompt_strict']:.3f} "
        f"({result['metrics']['n_prompts']} prompts, {time.perf_counter() - t:.0f}s)")
    return result


def finish(model, tok, template: str, held: Path, base: dict, cfg, run_dir, t_begin: float) -> dict:
    """Score the tuned model; print the table, write demo.svg/demo.json, print the JSON line."""
    tuned = constraint_eval(model, tok, template, held, cfg.demo.max_new_tokens)
    return write_demo_report(base, tuned, run_dir, time.perf_counter() - t_begin)
