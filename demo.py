"""The offline demo: instruction tuning makes a base model follow instructions it could not.

    python demo.py --config configs/demo.toml [section.key=value ...]

pico-base (5.4M parameters, pretrained on public-domain prose) cannot follow "answer in
lowercase" or "end with a P.S.". Without network or a teacher model, in a few minutes on a
laptop CPU, the demo:

  1. builds its training set (data/backtranslate.py): pico-base writes short texts about
     training topics; each text becomes (instruction, response) pairs by back-translation --
     a constraint it already satisfies or is edited to satisfy -- kept only if the IFEval
     checker passes; plus real Alpaca records. Files: <out_dir>/<name>-data/.
  2. scores the base model on held-out prompts (topics, tasks, wordings and values no
     training pair uses), greedy, with the IFEval checkers (evaluation/demo.py);
  3. fine-tunes with LoRA: the same setup / fit / finish as train.py (training/loop.py);
  4. scores the tuned model the same way, prints a before/after table per constraint type,
     writes <run folder>/demo.svg and demo.json, and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from data.backtranslate import build_demo_data
from evaluation.demo import constraint_eval, write_demo_report
from model.cli import run_cli
from model.options import opt
from model.tokenizer import Tokenizer
from training.config import Config, help_text, load_config
from training.loop import cpu_threads, finish, fit, setup


@dataclass
class DemoSection:
    constraints: list[str] = opt([], "IFEval instruction ids to teach and test (empty: all in "
                                 "data/demo_wordings.py)")
    mix: str = opt("", "real instruction data mixed into the built training set")
    mix_records: int = opt(0, "use only the first N conversations of mix (0: all)", ge=0)
    texts_per_topic: int = opt(8, "teacher texts sampled per training topic", ge=1)
    pairs_per_text: int = opt(4, "constraints derived from each teacher text", ge=1)
    heldout_per_type: int = opt(10, "held-out evaluation prompts per constraint type", ge=1)
    max_new_tokens: int = opt(96, "greedy tokens per held-out answer", ge=1)
    eval_batch_size: int = opt(50, "held-out prompts generated together", ge=1)


@dataclass
class DemoConfig(Config):
    """A training config plus the demo's own [demo] section (configs/demo.toml)."""
    demo: DemoSection = field(default_factory=DemoSection)


def run_demo(cfg: DemoConfig) -> dict:
    t_begin, d = time.perf_counter(), cfg.demo
    with cpu_threads(cfg.run.threads):
        tok = Tokenizer.from_pretrained(cfg.model.path)
        train_file, held_out = build_demo_data(
            cfg.model.path, tok, Path(cfg.run.out_dir) / f"{cfg.run.name}-data", mix=d.mix,
            mix_records=d.mix_records, per_topic=d.texts_per_topic, per_text=d.pairs_per_text,
            heldout_per_type=d.heldout_per_type, seed=cfg.run.seed, ids=list(d.constraints) or None)
        cfg.data.train = str(train_file)
        run = setup(cfg)

        def score(when: str) -> dict:
            t = time.perf_counter()
            result = constraint_eval(run.model, run.chat, held_out, d.max_new_tokens, d.eval_batch_size)
            print(f"held-out constraints {when}: pass rate {result['metrics']['prompt_strict']:.3f} "
                  f"({result['metrics']['n_prompts']} prompts, {time.perf_counter() - t:.0f}s)")
            return result

        with run.folder:  # a failure before the first save leaves the run folder as it was
            base = score("before")  # LoRA's B = 0: this is the base model
            fit(run)
            finish(run)
            tuned = score("after")
    return write_demo_report(base, tuned, run.run_dir, time.perf_counter() - t_begin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The offline demo: build data, score the base model, LoRA-tune, score again.",
        usage="python demo.py --config configs/demo.toml [section.key=value ...] [--debug]",
        epilog="options (section.key, default, meaning):\n" + help_text(DemoConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.toml", help="the demo's TOML file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of SFTError")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied after the file")
    args = parser.parse_args(argv)
    return run_cli(lambda: run_demo(load_config(args.config, args.overrides, DemoConfig)), args.debug)


if __name__ == "__main__":
    sys.exit(main())
