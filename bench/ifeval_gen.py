"""IFEval generation speed: batched prompts (one KV-cached decode for B rows) vs one at a time.

    python bench/ifeval_gen.py [--model checkpoints/pico-base] [--n 16] [--batch-size 8]
                               [--max-new-tokens 64] [--device auto] [--dtype float32]

Both runs use the same prompts, rendered with the model's template (pico-base: alpaca), greedy.
Batching pays because each decode step is a small matrix-vector product per row; stacking rows
turns it into a matrix-matrix product at almost the same cost. It also checks that the greedy
replies are identical both ways (left padding must not change any row's result).
Prints readable figures, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

from evaluation.generation import load_eval_model  # noqa: E402
from evaluation.ifeval import load_ifeval  # noqa: E402


def timed(em, convs, max_new_tokens, batch_size) -> tuple[float, list[str]]:
    if em.model.lm_head.weight.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = em.chat.replies(em.model, convs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if em.model.lm_head.weight.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / "pico-base"))
    p.add_argument("--data", default=str(SHARED_DATA / "ifeval_input_data.jsonl"))
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    em = load_eval_model(args.model, dtype=args.dtype, device=device)
    convs = [[{"role": "user", "content": it["prompt"]}] for it in load_ifeval(args.data, args.n)]
    timed(em, convs[:2], 4, 2)  # warm-up (allocator, kernels)
    t_batch, out_batch = timed(em, convs, args.max_new_tokens, args.batch_size)
    t_one, out_one = timed(em, convs, args.max_new_tokens, 1)
    same = sum(a == b for a, b in zip(out_batch, out_one))
    res = {
        "bench": "ifeval_gen", "model": Path(args.model).name, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": args.dtype,
        "threads": args.threads, "n_prompts": len(convs), "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "prompts_per_s_batched": round(len(convs) / t_batch, 3),
        "prompts_per_s_one_at_a_time": round(len(convs) / t_one, 3),
        "speedup": round(t_one / t_batch, 2),
        "greedy_replies_identical": f"{same}/{len(convs)}",
    }
    print(f"{len(convs)} IFEval prompts, up to {args.max_new_tokens} new tokens each, {device} {args.dtype}")
    print(f"  batched (batch {args.batch_size}): {t_batch:.2f} s  -> {res['prompts_per_s_batched']} prompts/s")
    print(f"  one at a time:        {t_one:.2f} s  -> {res['prompts_per_s_one_at_a_time']} prompts/s")
    print(f"  speedup {res['speedup']}x; greedy replies identical: {res['greedy_replies_identical']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
