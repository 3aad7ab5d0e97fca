"""`python -m data.filter --config FILE.toml [key=value ...]`: the command that runs the quality
filters of data/quality.py in sequence and keeps every reject.

    input = "../shared/data/llamafactory_alpaca_en_demo.json"   # JSON array or JSONL
    output_dir = "runs/filtered"
    [teacher]                      # only for the judge: model_dir = "..." or base_url = "..."
    model_dir = "checkpoints/pico-base"
    [[filters]]
    type = "exact_dedup"
    [[filters]]
    type = "near_dedup"            # threshold, num_perm, ngram, keep = "first" | "longest"
    threshold = 0.7
    [[filters]]
    type = "length"                # min/max_prompt_chars, min/max_response_chars, min/max_ratio,
                                   # max_total_tokens (+ model_dir for the tokenizer)
    [[filters]]
    type = "perplexity"            # model_dir, template, drop_low, drop_high, batch_size, max_len
    [[filters]]
    type = "judge"                 # min_score, max_tokens, batch_size

The config is read the way a training config is (model/options.py): every key of every table is
checked for its type and range before the first step runs, so a typo in step 3 writes nothing;
`--help` lists each filter's options. Each step reads the previous step's kept records and writes
`NN_type.kept.jsonl` and `NN_type.rejects.jsonl` (reason + record); the final kept set is
`kept.jsonl`. A table of counts per step is printed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data import quality as Q
from data.teacher import TeacherConfig, check_teacher, teacher_from_config
from model.cli import run_cli
from model.errors import SFTError
from model.options import help_text, load_options, opt


@dataclass
class FilterConfig:
    input: str = opt("", "records to filter: a JSON array or JSONL file (required)")
    output_dir: str = opt("", "folder for the per-step kept/rejects files and kept.jsonl (required)")
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the judge filter's judge
    filters: list[Q.ExactDedup | Q.NearDedup | Q.LengthFilter | Q.PerplexityFilter | Q.JudgeFilter] = opt(
        [], "the steps, in order: [[filters]] tables, each with a type (see below)", variants=Q.FILTERS)


def load_filter_config(path: str | None, overrides: list[str] = ()) -> FilterConfig:
    """Defaults < the TOML file < `key=value` overrides, every value checked; then what a type
    cannot say: the required keys, and the model or judge each step needs."""
    cfg = load_options(FilterConfig, path, overrides)
    where = str(path) if path else "command line"
    if not cfg.input or not cfg.output_dir:
        raise SFTError(f"{where}: set input = \"<records file>\" and output_dir = \"<folder>\" (both required)")
    if not cfg.filters:
        raise SFTError(f"{where}: no [[filters]] tables; add at least one, e.g. [[filters]] type = \"exact_dedup\"")
    for n, step in enumerate(cfg.filters, 1):
        at = f"{where}: [[filters]] #{n} ({_kind(step)})"
        if isinstance(step, Q.LengthFilter) and step.max_total_tokens and not step.model_dir:
            raise SFTError(f"{at}: max_total_tokens needs model_dir = <folder with the tokenizer>")
        if isinstance(step, Q.PerplexityFilter) and not step.model_dir:
            raise SFTError(f"{at}: the perplexity filter needs model_dir = <model folder>")
        if isinstance(step, Q.PerplexityFilter) and step.drop_low + step.drop_high >= 1:
            raise SFTError(f"{at}: drop_low + drop_high must be < 1 (they would drop every record)")
        if isinstance(step, Q.JudgeFilter):
            check_teacher(cfg.teacher, at)
    return cfg


def _kind(step) -> str:
    return next(k for k, cls in Q.FILTERS.items() if isinstance(step, cls))


def _model_and_tokenizer(folder: str):
    import torch

    from model import Tokenizer, load_pretrained
    return load_pretrained(folder, dtype=torch.float32).eval(), Tokenizer.from_pretrained(folder)


def run_step(records: list[dict], step, cfg: FilterConfig) -> tuple[list[dict], Q.Rejects]:
    """Apply one checked `[[filters]]` step; returns (kept, rejects)."""
    if isinstance(step, Q.ExactDedup):
        return Q.exact_dedup(records, step)
    if isinstance(step, Q.NearDedup):
        return Q.near_dedup(records, step)
    if isinstance(step, Q.LengthFilter):
        from model import Tokenizer
        tok = Tokenizer.from_pretrained(step.model_dir) if step.max_total_tokens else None
        return Q.length_filter(records, step, tokenizer=tok)
    if isinstance(step, Q.PerplexityFilter):
        model, tok = _model_and_tokenizer(step.model_dir)
        return Q.perplexity_filter(records, model, tok, step)
    teacher = teacher_from_config(cfg.teacher, cache_path=Path(cfg.output_dir) / "judge_cache.jsonl")
    return Q.judge_filter(records, teacher, step)


def run(cfg: FilterConfig) -> list[tuple[str, int, int, int]]:
    out = Path(cfg.output_dir)
    records = Q.read_records(cfg.input)
    table = [("input", len(records), len(records), 0)]
    for n, step in enumerate(tqdm(cfg.filters, desc="filters", unit="step", disable=None), 1):
        name = f"{n:02d}_{_kind(step)}"
        before = len(records)
        records, rejects = run_step(records, step, cfg)
        Q.write_filter_output(out, name, records, rejects)
        table.append((name, before, len(records), len(rejects)))
    Q.write_jsonl_atomic(out / "kept.jsonl", records)
    print(f"\n{'step':<20}{'in':>8}{'kept':>8}{'dropped':>9}")
    for name, before, kept, dropped in table[1:]:
        print(f"{name:<20}{before:>8}{kept:>8}{dropped:>9}")
    print(f"kept {len(records)} of {table[0][1]} -> {out / 'kept.jsonl'}")
    return table


def filters_help() -> str:
    """--help's list of options: the top level, then each [[filters]] type's own."""
    parts = ["options (key, default, meaning):", help_text(FilterConfig)]
    for kind, cls in Q.FILTERS.items():
        parts.append(f'\n[[filters]] type = "{kind}":')
        parts.append(help_text(cls) if dataclasses.fields(cls) else "  (no options)")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data.filter", description="Run data-quality filters in sequence, keeping every reject.",
        usage="python -m data.filter --config FILE.toml [key=value ...] [--debug]",
        epilog=filters_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file with input, output_dir, [teacher] and [[filters]] tables")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    p.add_argument("overrides", nargs="*", help="key=value or section.key=value, applied after the file")
    args = p.parse_args(argv)
    return run_cli(lambda: run(load_filter_config(args.config, args.overrides)), args.debug)


if __name__ == "__main__":
    sys.exit(main())
