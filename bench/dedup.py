"""Near-dedup throughput: MinHash + LSH over 50k records (GSM8K + Alpaca, replicated with edits).

    python bench/dedup.py [--n 50000] [--threshold 0.7]

The shared Alpaca-format files give ~8.5k distinct records; we replicate them with light
perturbations (a dropped word, a changed word, case) so that the set holds real near
duplicates, then time exact and near dedup. Prints figures, then one JSON line.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.dedup import exact_duplicates, near_duplicates  # noqa: E402


def perturb(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        if len(words) < 4:
            break
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.4:
            del words[i]
        elif op < 0.8:
            words[i] = rng.choice(["very", "the", "some", "big", "new"])
        else:
            words[i] = words[i].upper()
    return " ".join(words)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    rows = []
    for name in ("gsm8k_train_alpaca_format.json", "llamafactory_alpaca_en_demo.json"):
        rows += json.loads((Path(args.shared) / name).read_text())
    base = [r["instruction"] + "\n" + r.get("input", "") + "\n" + r["output"] for r in rows]
    rng = random.Random(0)
    texts = list(base)
    while len(texts) < args.n:
        texts.append(perturb(rng.choice(base), rng))
    texts = texts[: args.n]
    t0 = time.perf_counter()
    exact = exact_duplicates(texts)
    t1 = time.perf_counter()
    near = near_duplicates(texts, threshold=args.threshold)
    t2 = time.perf_counter()
    n_exact = sum(d is not None for d in exact)
    n_near = sum(d is not None for d in near)
    print(f"records {len(texts)} ({len(base)} distinct sources, the rest perturbed copies)")
    print(f"exact dedup: {n_exact} duplicates in {t1 - t0:.2f}s ({len(texts) / (t1 - t0):,.0f} records/s)")
    print(f"near dedup (MinHash 128 perms, LSH, J>={args.threshold}): {n_near} duplicates in "
          f"{t2 - t1:.2f}s ({len(texts) / (t2 - t1):,.0f} records/s)")
    print(json.dumps({"dedup_records": len(texts), "exact_dedup_records_per_s": round(len(texts) / (t1 - t0), 1),
                      "near_dedup_records_per_s": round(len(texts) / (t2 - t1), 1),
                      "near_duplicates_found": n_near, "exact_duplicates_found": n_exact}))


if __name__ == "__main__":
    main()
