"""`python -m data.filter --config FILE.toml`: run filters in sequence, keep every reject.

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
    type = "length"                # min/max_prompt_chars, min/max_response_chars, min/max_ratio, max_total_tokens
    [[filters]]
    type = "perplexity"            # model_dir, template, drop_low, drop_high, batch_size, max_len
    [[filters]]
    type = "judge"                 # min_score, max_tokens

Each step reads the previous step's kept records and writes `NN_type.kept.jsonl` and
`NN_type.rejects.jsonl` (reason + record); the final kept set is `kept.jsonl`. A table of
counts per step is printed at the end.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from tqdm import tqdm

from data import filters as F
from data.teacher import teacher_from_config
from model.cli import run_cli
from model.errors import SFTError
from model.files import read_text

FILTER_KEYS = {
    "exact_dedup": set(),
    "near_dedup": {"threshold", "num_perm", "ngram", "keep"},
    "length": {"min_prompt_chars", "max_prompt_chars", "min_response_chars", "max_response_chars",
               "max_total_tokens", "min_ratio", "max_ratio", "model_dir"},
    "perplexity": {"model_dir", "template", "drop_low", "drop_high", "batch_size", "max_len"},
    "judge": {"min_score", "max_tokens"},
}


def _model_and_tokenizer(folder: str):
    import torch

    from model import Tokenizer, load_pretrained
    return load_pretrained(folder, dtype=torch.float32).eval(), Tokenizer.from_pretrained(folder)


def check_step(step: dict, cfg: dict, where: str) -> None:
    """Refuse a bad `[[filters]]` table before any step runs: a typo in step 3 writes nothing."""
    kind = step.get("type")
    if kind not in FILTER_KEYS:
        raise SFTError(f"{where}: unknown filter type {kind!r}; known: {', '.join(FILTER_KEYS)}")
    unknown = set(step) - FILTER_KEYS[kind] - {"type"}
    if unknown:
        raise SFTError(f"{where}: unknown keys {sorted(unknown)} for {kind}; known: {sorted(FILTER_KEYS[kind])}")
    if kind == "length" and step.get("max_total_tokens") and "model_dir" not in step:
        raise SFTError(f"{where}: max_total_tokens needs model_dir = <folder with the tokenizer>")
    if kind == "perplexity" and "model_dir" not in step:
        raise SFTError(f"{where}: the perplexity filter needs model_dir")
    if kind == "judge" and "teacher" not in cfg:
        raise SFTError(f"{where}: the judge filter needs a [teacher] table")


def run_step(records: list[dict], step: dict, cfg: dict):
    """Apply one `[[filters]]` table (already checked); returns (kept, rejects)."""
    kind = step["type"]
    opts = {k: v for k, v in step.items() if k != "type"}
    if kind == "exact_dedup":
        return F.exact_dedup(records)
    if kind == "near_dedup":
        return F.near_dedup(records, **opts)
    if kind == "length":
        from model import Tokenizer
        folder = opts.pop("model_dir", None)
        tok = Tokenizer.from_pretrained(folder) if folder else None
        return F.length_filter(records, tokenizer=tok, **opts)
    if kind == "perplexity":
        model, tok = _model_and_tokenizer(opts.pop("model_dir"))
        return F.perplexity_filter(records, model, tok, **opts)
    out = Path(cfg["output_dir"])
    teacher = teacher_from_config(cfg["teacher"], cache_path=str(out / "judge_cache.jsonl"))
    return F.judge_filter(records, teacher, **opts)


def run(config_path: str) -> list[tuple[str, int, int, int]]:
    try:
        cfg = tomllib.loads(read_text(config_path, "filter config (TOML)"))
    except tomllib.TOMLDecodeError as e:
        raise SFTError(f"{config_path}: invalid TOML ({e})") from None
    for key in ("input", "output_dir", "filters"):
        if key not in cfg:
            raise SFTError(f"{config_path}: missing key {key!r}")
    steps = cfg["filters"]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise SFTError(f"{config_path}: 'filters' must be [[filters]] tables")
    for n, step in enumerate(steps, 1):
        check_step(step, cfg, f"{config_path} [[filters]] #{n}")
    out = Path(cfg["output_dir"])
    records = F.read_records(cfg["input"])
    table = [("input", len(records), len(records), 0)]
    for n, step in enumerate(tqdm(steps, desc="filters"), 1):
        name = f"{n:02d}_{step['type']}"
        before = len(records)
        records, rejects = run_step(records, step, cfg)
        F.write_filter_output(out, name, records, rejects)
        table.append((name, before, len(records), len(rejects)))
    F.write_jsonl_atomic(out / "kept.jsonl", records)
    print(f"\n{'step':<20}{'in':>8}{'kept':>8}{'dropped':>9}")
    for name, before, kept, dropped in table[1:]:
        print(f"{name:<20}{before:>8}{kept:>8}{dropped:>9}")
    print(f"kept {len(records)} of {table[0][1]} -> {out / 'kept.jsonl'}")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = ap.parse_args(argv)
    return run_cli(lambda: run(args.config), args.debug)


if __name__ == "__main__":
    sys.exit(main())
