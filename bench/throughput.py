"""Tokens/s, peak memory and MFU of one training step: our loop against transformers (+peft).

    python bench/throughput.py                       # ours only (system python)
    /work/parity-venv/bin/python bench/throughput.py # ours and HF side by side, with ratios

What is compared. The same model (pico-base from checkpoints/, and a randomly initialised
"110M" Llama: hidden 768, 12 layers, 12 heads, FFN 2048, vocab 32000, tied head), the same
batch (8 rows x 256 tokens, every token trainable), the same dtype (fp32, or `--autocast bf16`
for both), the same threads (2), and the same optimizer (torch AdamW; HF with the Trainer's
default, fused) with gradient clipping. "Ours" is train.py's `forward_backward` (chunked masked
loss, trainable-token normalisation) + clip + AdamW from training/optim.py. "HF" is
`LlamaForCausalLM(input_ids, labels=input_ids).loss.backward()` + clip + AdamW, with
`peft.get_peft_model` for LoRA (r=8, alpha=16, q_proj/v_proj, no dropout, on both sides).
Each stack runs as a user gets it, with its defaults: ours sends fp32 products through oneDNN
(model/matmul.py) and recomputes norm/SwiGLU outputs instead of storing them
(model/recompute.py); HF's go through torch.mm (MKL on x86).

"ours+ckpt" is the same loop with activation checkpointing per block (`train.activation_
checkpointing`): it trades ~1/3 more forward compute for most of the activation memory.

How it is measured. Every (model, mode, stack) runs in fresh subprocesses, so one run's freed
memory cannot hide another's peak. In the child: build the model, optimizer and batch, reset
the kernel's peak-RSS counter (`/proc/self/clear_refs` = 5), take the resident size as the
baseline, run the steps; peak = VmHWM - baseline, i.e. everything training adds on top of the
weights: gradients, AdamW moments, activations, logits, temporaries. Speed comes from one child
with the default allocator (tokens/s from the median step; tokens per CPU-second from
process_time, which other processes on a shared machine disturb less; with 2 threads OpenMP's
spin-waiting is counted too, so on a busy machine `--threads 1` compares best). Peak memory comes
from a second child run with MALLOC_MMAP_THRESHOLD_=131072, so that freed blocks go back to the
OS and RSS follows the live tensors (with glibc's default the peak also counts whatever its
free lists happened to hold; that figure is printed as "RSS").

MFU. A step over n tokens costs ~6 N n FLOPs for full fine-tuning (forward 2N, backward 4N:
gradients for activations and for weights) and ~4 N n for LoRA (no weight gradients for the
frozen matrices), N = parameters in matmuls, output head included, embedding lookup excluded
(attention's T^2 term is left out, as usual). It is divided by this machine's measured fp32
matmul throughput (best of a few GEMMs shaped like the model's, through torch.mm and through
oneDNN, the faster library counting), not by a datasheet figure.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

BATCH, SEQ = 8, 256
PICO = ROOT / "checkpoints" / "pico-base"
SHAPE_110M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)
LORA = dict(r=8, alpha=16, targets=["q_proj", "v_proj"])
STEPS = {"pico": (2, 8), "110m": (1, 2)}  # (warmup, timed) steps
ROUNDS = {"pico": 2, "110m": 1}           # speed runs per stack (best counts), unless --rounds


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns the baseline in KiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kib("VmRSS")


def matmul_flops(threads: int) -> dict[str, float]:
    """Best fp32 GEMM FLOP/s over shapes like the model's (tokens x hidden x ffn/vocab), for
    torch's default (`torch.mm`: MKL on x86) and for oneDNN (model/matmul.py), which our loop
    uses; the faster of the two is this machine's fp32 peak for MFU."""
    from model.matmul import mm_t, set_onednn

    torch.set_num_threads(threads)
    best = {"torch_mm": 0.0, "onednn": 0.0}
    for m, k, n in ((2048, 768, 2048), (2048, 768, 768), (2048, 256, 688), (2048, 768, 4096)):
        a, b = torch.randn(m, k), torch.randn(n, k)
        for lib in best:
            if lib == "onednn" and not set_onednn(True):
                continue
            f = (lambda: a @ b.t()) if lib == "torch_mm" else (lambda: mm_t(a, b))
            f()
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                f()
                reps += 1
            best[lib] = max(best[lib], 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def matmul_params(model: torch.nn.Module) -> int:
    """N for the 6N rule: every Linear weight (the head counted once even if tied), no embedding."""
    seen, n = set(), 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear) and id(w) not in seen:
            seen.add(id(w))
            n += w.numel()
    return n


# ----------------------------------------------------------------------------- the two stacks

def build_ours(model_name: str, mode: str, checkpointing: bool = False):
    from lora import apply_lora
    from model.checkpoint import load_pretrained
    from model.llama import Config, Transformer
    from model import speedups
    from training.optim import build_optimizer
    from training.step import forward_backward

    if model_name == "pico":
        model = load_pretrained(PICO)
    else:
        model = Transformer(Config(**SHAPE_110M))
    n = matmul_params(model)
    if mode == "lora":
        apply_lora(model, r=LORA["r"], alpha=LORA["alpha"], targets=tuple(LORA["targets"]))
    speedups.apply(model)  # as train.py does by default (train.speedups)
    if checkpointing:
        from training.distributed import checkpoint_blocks
        checkpoint_blocks(model)
    model.train()
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(3, model.config.vocab_size, (BATCH, SEQ))
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
             "seq_ids": torch.zeros(BATCH, SEQ, dtype=torch.long)}  # one sample per row
    n_tok = BATCH * (SEQ - 1)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        forward_backward(model, [batch], 1.0 / n_tok, 0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, n, step


def build_hf(model_name: str, mode: str):
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_name == "pico":
        model = LlamaForCausalLM.from_pretrained(PICO, dtype=torch.float32)
    else:
        cfg = {k: v for k, v in SHAPE_110M.items()}
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    n = matmul_params(model)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 target_modules=LORA["targets"], lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # the HF Trainer's default optimizer on torch >= 2.8 is "adamw_torch_fused"
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            fused=True)
    ids = torch.randint(3, model.config.vocab_size, (BATCH, SEQ))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, n, step


def child(model_name: str, mode: str, stack: str, threads: int, autocast: str,
          memory_only: bool) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if stack == "hf":
        model, n, step = build_hf(model_name, mode)
    else:
        model, n, step = build_ours(model_name, mode, checkpointing=stack == "ours+ckpt")
    warmup, timed = (0, 2) if memory_only else STEPS[model_name]
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast == "bf16"
           else torch.autocast("cpu", enabled=False))
    base = reset_peak()
    times, cpu = [], []
    with ctx:
        for i in range(warmup + timed):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    peak = rss_kib("VmHWM") - base
    return {"tokens_per_s": BATCH * SEQ / statistics.median(times), "peak_mib": peak / 1024,
            "tokens_per_cpu_s": BATCH * SEQ / statistics.median(cpu),
            "n_matmul_params": n, "step_s": times}


def run_child(python: str, model_name: str, mode: str, stack: str, args,
              memory_only: bool = False) -> dict | None:
    cmd = [python, __file__, "--child", model_name, mode, stack,
           "--threads", str(args.threads), "--autocast", args.autocast]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if memory_only:
        cmd.append("--memory-only")
        # a fixed mmap threshold hands every freed block >= 128 KiB straight back to the OS, so
        # RSS follows the live tensors (like tracemalloc) instead of malloc's cached free lists
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"  {model_name} {mode} {stack}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(python: str, model_name: str, mode: str, stacks: list[str], args) -> dict:
    """Per stack: speed = best of `rounds` children with the default allocator (the stacks take
    turns, so a burst of load elsewhere hits them alike); peak live memory from one more child."""
    best: dict[str, dict] = {}
    for _ in range(args.rounds or ROUNDS[model_name]):
        for stack in stacks:
            r = run_child(python, model_name, mode, stack, args)
            if r is not None and (stack not in best or r["tokens_per_s"] > best[stack]["tokens_per_s"]):
                best[stack] = {**r, "tokens_per_cpu_s": max(r["tokens_per_cpu_s"],
                                                            best.get(stack, r)["tokens_per_cpu_s"])}
    for stack in list(best):
        mem = run_child(python, model_name, mode, stack, args, memory_only=True)
        if mem is None:
            del best[stack]
            continue
        best[stack].update(peak_rss_mib=best[stack]["peak_mib"], peak_mib=mem["peak_mib"])
    return best


def hf_available(python: str) -> bool:
    probe = "import transformers, peft"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="pico,110m")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--stacks", default="ours,ours+ckpt,hf",
                    help="ours, ours+ckpt (activation checkpointing per block) and/or hf "
                         "(hf needs transformers+peft)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=0,
                    help="speed runs per stack, the best counts (default: 2 pico, 1 110m)")
    ap.add_argument("--autocast", default="none", choices=("none", "bf16"))
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "STACK"), help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.threads, args.autocast, args.memory_only)))
        return

    stacks = args.stacks.split(",")
    if "hf" in stacks and not hf_available(sys.executable):
        print("transformers/peft not importable here: measuring ours only "
              "(run with /work/parity-venv/bin/python for the comparison)")
        stacks = [s for s in stacks if s != "hf"]
    gemm = matmul_flops(args.threads)
    load = os.getloadavg()
    print(f"fp32 matmul ({args.threads} threads): torch.mm {gemm['torch_mm'] / 1e9:.1f} GFLOP/s, "
          f"oneDNN {gemm['onednn'] / 1e9:.1f}; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cores); autocast "
          f"{args.autocast}; batch {BATCH}x{SEQ}")
    out: dict[str, float] = {"load_avg_1m_start": round(load[0], 2)}
    results = {}
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            results[model_name, mode] = measure(sys.executable, model_name, mode, stacks, args)
    # the machine may be shared: take the best matmul rate seen, before or after the runs
    gemm = {lib: max(v, gemm[lib]) for lib, v in matmul_flops(args.threads).items()}
    peak_flops = max(gemm.values())
    out.update(matmul_gflops_torch_mm=round(gemm["torch_mm"] / 1e9, 2),
               matmul_gflops_onednn=round(gemm["onednn"] / 1e9, 2),
               matmul_gflops=round(peak_flops / 1e9, 2), load_avg_1m_end=round(os.getloadavg()[0], 2))
    print(f"fp32 matmul peak used for MFU: {peak_flops / 1e9:.1f} GFLOP/s; load average now "
          f"{os.getloadavg()[0]:.2f}")
    for (model_name, mode), got in results.items():
        for stack, r in got.items():
            flops_per_tok = (6 if mode == "full" else 4) * r["n_matmul_params"]
            mfu = r["tokens_per_s"] * flops_per_tok / peak_flops
            key = f"{model_name}_{mode}_{stack.replace('+', '_')}"
            out.update({f"tokens_per_s_{key}": round(r["tokens_per_s"], 1),
                        f"peak_mib_{key}": round(r["peak_mib"], 1), f"mfu_{key}": round(mfu, 4)})
            print(f"{model_name:5s} {mode:5s} {stack:9s}: {r['tokens_per_s']:8.1f} tok/s "
                  f"({r['tokens_per_cpu_s']:7.1f} per CPU-s)  "
                  f"peak {r['peak_mib']:7.1f} MiB (RSS {r['peak_rss_mib']:7.1f})  "
                  f"MFU {100 * mfu:5.1f}%  "
                  f"(N={r['n_matmul_params'] / 1e6:.2f}M, steps "
                  + " ".join(f"{t:.2f}s" for t in r["step_s"]) + ")")
        for ours, suffix in (("ours", ""), ("ours+ckpt", "_ckpt")):
            if ours in got and "hf" in got:
                tr = got[ours]["tokens_per_s"] / got["hf"]["tokens_per_s"]
                cr = got[ours]["tokens_per_cpu_s"] / got["hf"]["tokens_per_cpu_s"]
                mr = got[ours]["peak_mib"] / max(got["hf"]["peak_mib"], 1e-9)
                out[f"tokens_per_s_ratio_{model_name}_{mode}{suffix}"] = round(tr, 3)
                out[f"tokens_per_cpu_s_ratio_{model_name}_{mode}{suffix}"] = round(cr, 3)
                out[f"peak_mem_ratio_{model_name}_{mode}{suffix}"] = round(mr, 3)
                print(f"{model_name:5s} {mode:5s} {ours}/hf: tokens/s x{tr:.2f} "
                      f"(per CPU-second x{cr:.2f}), peak memory x{mr:.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
