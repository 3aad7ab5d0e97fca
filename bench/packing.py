"""How much of a batch is real tokens: packing vs padding to the longest sample.

    python bench/packing.py [--batch 8] [--model checkpoints/pico-base] [--template alpaca]

For each Alpaca-format file in ../shared/data (the LLaMA-Factory demo and GSM8K) it tokenizes
every record with the pico-base tokenizer and the alpaca template (timed: samples/s through
template + tokenize + mask, including the prompt/response prefix checks), then for max_seq_len
512/1024/2048 compares
- padded: shuffled samples in batches of --batch, each batch padded to its longest sample;
- packed: best-fit-decreasing rows of max_seq_len (data/packing.py).
Real fraction = non-pad tokens / all token positions computed. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.formats import load_conversations  # noqa: E402
from data.masking import tokenize_dataset, truncate  # noqa: E402
from data.packing import pack, real_fraction  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402

SHARED = Path(os.environ.get("SFT_SHARED_DIR", ROOT.parent / "shared"))
FILES = {"alpaca_en_demo": "data/llamafactory_alpaca_en_demo.json", "gsm8k": "data/gsm8k_train_alpaca_format.json"}
LENGTHS = (512, 1024, 2048)


def padded_fraction(lengths: list[int], batch: int, seed: int = 0) -> float:
    order = lengths[:]
    random.Random(seed).shuffle(order)
    real = total = 0
    for k in range(0, len(order), batch):
        group = order[k:k + batch]
        real += sum(group)
        total += max(group) * len(group)
    return real / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "pico-base"))
    p.add_argument("--template", default="alpaca")
    args = p.parse_args()
    tok = Tokenizer.from_pretrained(args.model)
    result: dict[str, float] = {}
    combined = {L: [0, 0] for L in LENGTHS}  # real tokens, positions (packed, both files)
    for short, rel in FILES.items():
        convs = load_conversations(SHARED / rel)
        t0 = time.perf_counter()
        samples, report = tokenize_dataset(tok, args.template, convs, None, source=rel)
        dt = time.perf_counter() - t0
        sps = len(convs) / dt
        print(f"{short}: {len(convs)} records, tokenized in {dt:.2f}s = {sps:.0f} samples/s; {report.summary()}")
        result[f"tokenize_samples_per_s_{short}"] = round(sps, 1)
        for L in LENGTHS:
            kept = [s for s in (truncate(s, L) for s in samples) if s is not None]
            lengths = [len(s["input_ids"]) for s in kept]
            t0 = time.perf_counter()
            rows = pack(kept, L)
            pack_s = time.perf_counter() - t0
            packed = real_fraction(rows)
            padded = padded_fraction(lengths, args.batch)
            combined[L][0] += sum(lengths)
            combined[L][1] += len(rows) * L
            print(f"  max_seq_len {L:>4}: {len(kept)} samples -> {len(rows)} packed rows ({pack_s * 1e3:.0f} ms); "
                  f"real tokens: packed {packed:.1%} vs padded-to-longest (batch {args.batch}) {padded:.1%}")
            result[f"packed_real_fraction_{short}_{L}"] = round(packed, 4)
            result[f"padded_real_fraction_{short}_{L}"] = round(padded, 4)
    for L in LENGTHS:
        result[f"packed_real_fraction_{L}"] = round(combined[L][0] / combined[L][1], 4)
    print("packed real fraction, both files: " + ", ".join(f"{L}: {result[f'packed_real_fraction_{L}']:.1%}" for L in LENGTHS))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
