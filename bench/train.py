"""Training speed and memory of our loop: a few fine-tuning steps on a shared model.

    python bench/train.py [--model DIR] [--data FILE] [--batch-size 8] [--seq-len 256] [--steps 5]
                          [--finetune full|lora] [--isa native,avx2]

Uses the training loop's own pieces (training/data.py, training/step.py, model/speedups.py,
AdamW), so what is measured is what `train.py` runs. Rows are packed (no padding work), so "tokens/s" counts real tokens;
"trainable tokens/s" counts only the ones with a label (assistant replies), the figure that
matters for SFT. Peak memory is the process's peak RSS on CPU (ru_maxrss, which includes the
Python interpreter and torch, ~300-400 MB) or torch's peak allocated bytes on CUDA. The CPU
seconds per step and the load average are printed too: on a shared machine wall time includes
waiting for a core, CPU time does not. `--isa avx2` measures in a child process whose math
libraries are capped to AVX2 (bench/_isa.py), `--isa native,avx2` both, one fresh child each;
the CPU model and the ISA each library reports are printed with the figures. Ends with one
JSON line (with several ISAs: one object per ISA in it).
"""
from __future__ import annotations

import os
import sys

# run as a script, sys.path[0] is bench/; the repository root goes there instead, so that the
# project's packages import and no bench script can shadow a standard-library module
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench._isa import cpu_description, describe_cpu, parse_isas, report_isa, run_capped, runs_as  # noqa: E402
from data.chat import chat_for  # noqa: E402
from model import speedups  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import prepare_data  # noqa: E402
from training.loop import load_model, pick_device  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.step import forward_backward, to_device, trainable_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    shared = ROOT.parent / "shared" / "models" / "pico-base"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(shared if shared.exists() else ROOT / "checkpoints/pico-base"))
    p.add_argument("--data", default=str(ROOT / "data/quickstart/alpaca_300.jsonl"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=0, help="train.loss_chunk (0 = auto)")
    p.add_argument("--device", default="auto")
    p.add_argument("--finetune", default="full", choices=("full", "lora"))
    p.add_argument("--isa", default="native",
                   help="native and/or avx2 (math libraries capped to AVX2, see bench/_isa.py)")
    a = p.parse_args()
    isas = parse_isas(a.isa)
    if len(isas) == 1 and runs_as(isas[0]):
        return measure(a, isas[0])
    print(f"CPU: {describe_cpu(cpu_description())}")
    out = {}
    for isa in isas:  # each in a fresh child, under its caps
        report_isa(isa)
        res = run_capped(isa, sys.argv)
        print(res.stdout, end="")
        if res.returncode:
            sys.exit(res.returncode)
        out[isa] = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(out))


def measure(a: argparse.Namespace, isa: str) -> None:
    cfg = load_config(None, [f"model.path={a.model}", f"data.train={a.data}",
                             f"data.max_seq_len={a.seq_len}", "data.template=alpaca",
                             "data.eval_fraction=0.0", f"run.threads={a.threads}",
                             f"run.device={a.device}", f"model.finetune={a.finetune}"])
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = pick_device(cfg.run.device)
    tok = Tokenizer.from_pretrained(cfg.model.path)
    rows = prepare_data(cfg, chat_for(cfg.model.path, tok, "alpaca")).train
    model = load_model(cfg, device)
    if cfg.train.speedups:
        speedups.apply(model)
    opt = build_optimizer(model, 1e-4, 0.0, (0.9, 0.95), 1e-8)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    timed_s, cpu_s, tokens, trainable = 0.0, 0.0, 0, 0
    for step in range(a.warmup + a.steps):
        idx = [(step * a.batch_size + i) % len(rows["input_ids"]) for i in range(a.batch_size)]
        batch = to_device(rows, idx, device)
        n = trainable_tokens(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        forward_backward(model, [batch], n, a.chunk)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= a.warmup:
            timed_s += time.perf_counter() - t0
            cpu_s += time.process_time() - c0
            tokens += int((batch["seq_ids"] >= 0).sum())  # real tokens: padding has seq id -1
            trainable += n

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    n_params = sum(p.numel() for p in model.parameters())
    cpu = cpu_description()
    res = {"model": Path(a.model).name, "finetune": a.finetune, "params": n_params,
           "device": device.type, "isa": isa, "cpu": cpu["model_name"], "cpu_family": cpu["family"],
           "cpu_model": cpu["model"], "cpu_flags": " ".join(cpu["flags"]),
           "threads": a.threads, "batch_size": a.batch_size, "seq_len": a.seq_len, "steps": a.steps,
           "step_s": timed_s / a.steps, "cpu_s_per_step": cpu_s / a.steps,
           "load_avg_1min": round(os.getloadavg()[0], 2), "tokens_per_s": tokens / timed_s,
           "trainable_tokens_per_s": trainable / timed_s, "trainable_fraction": trainable / max(tokens, 1),
           "peak_rss_mb": round(peak_rss_mb, 1),
           "peak_cuda_mb": None if peak_cuda_mb is None else round(peak_cuda_mb, 1)}
    print(f"{res['model']} ({a.finetune}, {n_params:,} params) on {device.type} [{isa}: "
          f"{describe_cpu(cpu)}], {a.threads} threads, batch {a.batch_size} x {a.seq_len} packed "
          f"tokens, {a.steps} timed steps")
    print(f"  {res['step_s']:.3f} s/step   {res['tokens_per_s']:,.0f} tokens/s   "
          f"{res['trainable_tokens_per_s']:,.0f} trainable tokens/s ({res['trainable_fraction']:.0%})")
    print(f"  {res['cpu_s_per_step']:.3f} CPU-s/step (all threads); 1-min load average "
          f"{res['load_avg_1min']} on {os.cpu_count()} cores (above the core count, wall times "
          f"include waiting for a CPU)")
    print(f"  peak RSS {peak_rss_mb:,.0f} MB" + (f", peak CUDA {peak_cuda_mb:,.0f} MB" if peak_cuda_mb else ""))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
