"""Generation speed with and without the KV cache, and the peak memory of loading a checkpoint.

    python bench/generate.py [--model checkpoints/pico-base] [--new-tokens 128] [--threads 1]

One thread by default: these models are so small that each matmul takes microseconds, and
on a busy machine the cost of waking a second thread for every op outweighs its help.

Uncached generation re-runs the whole sequence for every new token (cost grows with length);
cached generation runs one position per token. Loading memory is the growth of the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs) while `load_pretrained` runs,
compared with the bytes of the weights. Expect the weights plus a few MB (each tensor is
copied out of the mapped file in 1 MB slices whose pages are then dropped). A naive load (random-initialised model, then a copy
of the state dict) is measured the same way for contrast. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import Config, Tokenizer, Transformer, load_pretrained  # noqa: E402
from model.checkpoint import read_config  # noqa: E402
from model.safetensors import load_sharded  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_growth(fn) -> tuple[int, object]:
    """Bytes the peak RSS grew above the current RSS while fn() ran; returns (bytes, result)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = fn()
    return (_status_kib("VmHWM") - before) * 1024, out


def naive_load(folder: str) -> Transformer:
    model = Transformer(read_config(Path(folder)))  # random init: a first full copy
    sd = {k.removeprefix("model."): v for k, v in load_sharded(folder).items()}
    model.load_state_dict(sd, strict=False)  # copied in: the second
    return model


def load_peak_in_fresh_process(how: str, folder: str) -> int:
    """Peak RSS growth of one load, in a child process so no freed memory is reused."""
    out = subprocess.run([sys.executable, __file__, "--measure-load", how, "--model", folder],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def measure_load(how: str, folder: str) -> None:
    torch.set_num_threads(1)
    with torch.device("meta"):  # first meta build imports ~800 torch modules (~75 MB), once per
        Transformer(Config(vocab_size=8, hidden_size=8, intermediate_size=8,  # process: not weights
                           num_hidden_layers=1, num_attention_heads=1))
    fn = {"ours": lambda: load_pretrained(folder), "naive": lambda: naive_load(folder)}[how]
    print(peak_rss_growth(fn)[0])


def uncached_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / "pico-base"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure-load", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_load:
        return measure_load(args.measure_load, args.model)
    torch.set_num_threads(args.threads)

    weights = load_sharded(args.model)
    weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    del weights
    load_peak = load_peak_in_fresh_process("ours", args.model)
    naive_peak = load_peak_in_fresh_process("naive", args.model)
    model = load_pretrained(args.model)
    tok = Tokenizer.from_pretrained(args.model)
    prompt = tok.encode("Once upon a time", bos=True)
    n = args.new_tokens

    model.generate([prompt], max_new_tokens=4, stop_ids=())  # warm-up
    t_cached, cached = timed(lambda: model.generate([prompt], max_new_tokens=n, stop_ids=())[0])
    t_uncached, uncached = timed(lambda: uncached_greedy(model, prompt, n))
    prompts = [tok.encode(t, bos=True) for t in ["Once upon a time", "The little girl", "It was a dark",
                                                 "He said"] * (args.batch // 4 + 1)][:args.batch]
    t_batch, _ = timed(lambda: model.generate(prompts, max_new_tokens=n, stop_ids=()))

    res = {
        "model": Path(args.model).name, "threads": args.threads, "new_tokens": n,
        "cached_tok_per_s": round(n / t_cached, 1), "uncached_tok_per_s": round(n / t_uncached, 1),
        "cache_speedup": round(t_uncached / t_cached, 2), "cached_equals_uncached": cached == uncached,
        f"batched{args.batch}_tok_per_s": round(args.batch * n / t_batch, 1),
        "weights_mb": round(weight_bytes / 1e6, 2), "load_peak_rss_growth_mb": round(load_peak / 1e6, 2),
        "load_peak_over_weights": round(load_peak / weight_bytes, 2),
        "naive_load_peak_over_weights": round(naive_peak / weight_bytes, 2),
    }
    print(f"model {res['model']}, {n} new tokens, {args.threads} threads")
    print(f"  cached   {res['cached_tok_per_s']:8.1f} tok/s")
    print(f"  uncached {res['uncached_tok_per_s']:8.1f} tok/s  (cache speed-up {res['cache_speedup']}x, "
          f"same tokens: {res['cached_equals_uncached']})")
    print(f"  batch {args.batch}  {res[f'batched{args.batch}_tok_per_s']:8.1f} tok/s")
    print(f"  loading: weights {res['weights_mb']} MB, peak RSS growth {res['load_peak_rss_growth_mb']} MB "
          f"({res['load_peak_over_weights']}x weights; naive load {res['naive_load_peak_over_weights']}x)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
