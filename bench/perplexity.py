"""Perplexity scoring throughput (samples/s) of the perplexity filter on a shared model.

    python bench/perplexity.py [--model checkpoints/pico-base] [--n 128] [--batch-sizes 1,8,32]

Scores the responses of the first n Alpaca demo records, rendered with the alpaca template,
once per batch size. Prints figures, then one JSON line.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data.quality import read_records, response_perplexities  # noqa: E402
from model import Tokenizer, load_pretrained  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "pico-base"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "llamafactory_alpaca_en_demo.json"))
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_pretrained(args.model).eval(), Tokenizer.from_pretrained(args.model)
    records = read_records(args.data)[: args.n]
    result = {"ppl_samples": len(records), "ppl_model": Path(args.model).name, "threads": args.threads}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        t0 = time.perf_counter()
        ppl = response_perplexities(records, model, tok, batch_size=bs)
        dt = time.perf_counter() - t0
        print(f"batch {bs:>3}: {len(records) / dt:8.1f} samples/s  (median ppl {sorted(ppl)[len(ppl) // 2]:.1f})")
        result[f"ppl_samples_per_s_batch{bs}"] = round(len(records) / dt, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
