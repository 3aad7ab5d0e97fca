"""Supervised fine-tuning: `python train.py --config configs/NAME.toml [section.key=value ...]`.

The same command runs in every process under `torchrun --nproc_per_node N train.py ...`.
A run is three phases (training/loop.py), each a short read:

  1. setup    config (training/config.py: TOML + overrides, every value checked); tokenizer and
              chat template (data/chat.py); data: conversations (data/formats.py) -> held-out
              split -> template + tokenize with labels = -100 outside assistant replies
              (data/masking.py) -> packed rows with restarting positions and per-sample
              attention (data/packing.py); model: HF folder -> Transformer (model/checkpoint.py),
              LoRA/QLoRA (lora.py, model/nf4.py), CPU speed-ups (model/speedups.py), FSDP2
              (training/distributed.py); AdamW + cosine schedule (training/optim.py); the run
              folder (training/checkpointing.py), touched only once everything above worked.
  2. fit      the optimizer steps: loss normalised by the trainable tokens of the whole step
              (training/step.py), clipping, AdamW, held-out loss, step_N/ checkpoints.
  3. finish   held-out loss after, final/ (HF folder or PEFT adapter), loss.svg, samples.

Outputs in <run.out_dir>/<run.name>/: config.toml, metrics.jsonl, loss.svg, step_N/, final/.
Exit status: 0 when final/ is written; 2 for a bad input (one line naming the file and key, or a
run that learned nothing); 130 / 143 when stopped by SIGINT / SIGTERM (model/cli.py), with the
last checkpoint intact. training/run_folder.py: what happens to an earlier run in the folder.
"""
from __future__ import annotations

import argparse
import sys
import tomllib

from model.cli import run_cli
from model.errors import SFTError
from model.files import read_text
from training import distributed as D
from training.config import Config, help_text, load_config
from training.loop import train


def read_config(path: str | None, overrides: list[str]) -> Config:
    """The run's config; the demo's own config (a [demo] section) is pointed to demo.py."""
    if path:
        try:
            demo = "demo" in tomllib.loads(read_text(path, "config file (TOML)"))
        except tomllib.TOMLDecodeError:
            demo = False  # load_config names the line
        if demo:
            raise SFTError(f"{path}: a [demo] section: this is the offline demo's config; run it with "
                           f"python demo.py --config {path}")
    return load_config(path, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fine-tune a Llama-family model on instruction data.",
        usage="python train.py --config configs/NAME.toml [section.key=value ...] [--debug]",
        epilog="config options (section.key, default, meaning):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file with [run], [model], [data], ... sections")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of SFTError")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied after the file")
    args = parser.parse_args(argv)
    status = 1
    try:
        status = run_cli(lambda: train(read_config(args.config, args.overrides)), args.debug)
        return status
    finally:
        D.teardown(clean=status == 0)


if __name__ == "__main__":
    sys.exit(main())
