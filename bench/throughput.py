"""Tokens/s, peak memory and MFU of one training step: our loop against transformers (+peft).

    python bench/throughput.py                          # ours only (system python)
    /work/parity-venv/bin/python bench/throughput.py    # ours and HF side by side, native + AVX2
    ... --isa native --models pico --steps 4            # a quick look

What is compared. The same model (pico-base from checkpoints/, and a randomly initialised
"110M" Llama: hidden 768, 12 layers, 12 heads, FFN 2048, vocab 32000, tied head), the same
batch (8 rows x 256 tokens, every token trainable), the same dtype (fp32, or `--autocast bf16`
for both), the same threads (2), and the same optimizer (torch AdamW; HF with the Trainer's
default, fused) with gradient clipping. "Ours" is train.py's `forward_backward` (chunked masked
loss, trainable-token normalisation) + clip + AdamW from training/optim.py, after
`model.speedups.apply` as train.py does by default. "HF" is
`LlamaForCausalLM(input_ids, labels=input_ids).loss.backward()` + clip + AdamW, with
`peft.get_peft_model` for LoRA (r=8, alpha=16, q_proj/v_proj, no dropout, on both sides).
"ours+ckpt" is our loop with activation checkpointing per block (`train.activation_
checkpointing`): ~1/3 more forward compute for most of the activation memory. "ours+compile" is
`train.compile`: each block through torch.compile (CPU inductor), plain blocks (model/speedups.py);
its first step, which pays for the compilation, is printed with every stack's.

Where the time goes (`--profile`): three more steps per stack under torch.profiler, split into
GEMMs, the attention kernels and the rest (the median of each). Both stacks run the same
products through the same library at the same FLOPs, so a stack's GEMM + attention time bounds
what leaner code elsewhere can win: the "ceiling" printed is HF's whole profiled step over that
time, the ratio it would reach if everything else cost nothing. The profiler's own cost falls
mostly on the many small ops of the rest, which inflates HF's step more than those two, so the
ceiling errs high.

Instruction sets (`--isa native,avx2`, the default: both, in one run). `native` is this
machine as it is; `avx2` caps MKL, oneDNN and torch's own kernels to AVX2 in the children
(bench/_isa.py), which is what most laptops and AMD CPUs before Zen 4 run. The ISA each
library reports is printed with the CPU model, family and flags, because which stack wins
depends on them.

How it is measured. Speed: per (isa, model, mode) one child per stack, all started together;
each builds its model and warms up, then they take turns, one step each (the order rotating
every round), so a burst of load from elsewhere on a shared machine hits every stack alike.
tokens/s comes from each stack's median step; the ratio printed is the median of the per-round
ratios (paired steps), and the same for tokens per CPU-second (process_time, which waiting for
a core does not inflate; with 2 threads OpenMP's spin-waiting is counted too). Memory: one more
fresh child per stack, so one run's freed memory cannot hide another's peak; it builds, resets
the kernel's peak-RSS counter (`/proc/self/clear_refs` = 5), takes the resident size as the
baseline and runs two steps; peak = VmHWM - baseline, i.e. everything training adds on top of
the weights (gradients, AdamW moments, activations, logits, temporaries), with
MALLOC_MMAP_THRESHOLD_=131072 so that freed blocks go back to the OS and RSS follows the live
tensors (glibc's default caching is printed as "RSS", from the speed child).

MFU. A step over n tokens costs ~6 N n FLOPs for full fine-tuning (forward 2N, backward 4N)
and ~4 N n for LoRA (no weight gradients for the frozen matrices), N = parameters in matmuls,
output head included, embedding lookup excluded (attention's T^2 term left out, as usual),
divided by this machine's measured fp32 matmul rate under the same ISA cap (best of a few
GEMMs shaped like the model's, through torch.mm and through oneDNN, the faster counting).
"""
from __future__ import annotations

import os
import sys

# run as a script, sys.path[0] is bench/; the repository root goes there instead, so that the
# project's packages import and no bench script can shadow a standard-library module
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench._isa import cpu_description, describe_cpu, isa_env, parse_isas, report_isa  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 8, 256
PICO = ROOT / "checkpoints" / "pico-base"
SHAPE_110M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)
LORA = dict(r=8, alpha=16, targets=["q_proj", "v_proj"])
STEPS = {"pico": (2, 9), "110m": (1, 3)}  # (warmup, timed rounds), unless --steps
MARK = "@@ "  # a protocol line from a child (anything else a library prints is passed over)


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
    torch's default (`torch.mm`: MKL on x86) and for oneDNN; the faster is the MFU peak."""
    import torch
    from model.matmul import ONEDNN, TORCH, forward_mm, set_routing

    torch.set_num_threads(threads)
    best = {"torch_mm": 0.0, "onednn": 0.0}
    for m, k, n in ((2048, 768, 2048), (2048, 768, 768), (2048, 256, 688), (2048, 768, 4096)):
        a, b = torch.randn(m, k), torch.randn(n, k)
        for lib, routing in (("torch_mm", TORCH), ("onednn", ONEDNN)):
            if set_routing(routing) != routing:
                continue
            forward_mm(a, b)
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.3:
                forward_mm(a, b)
                reps += 1
            best[lib] = max(best[lib], 2 * m * k * n * reps / (time.perf_counter() - t0))
    set_routing(TORCH)
    return best


def matmul_params(model) -> int:
    """N for the 6N rule: every Linear weight (the head counted once even if tied), no embedding."""
    import torch
    seen, n = set(), 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear) and id(w) not in seen:
            seen.add(id(w))
            n += w.numel()
    return n


# ----------------------------------------------------------------------------- the two stacks

def build_ours(model_name: str, mode: str, stack: str = "ours"):
    import torch
    from lora import apply_lora
    from model import speedups
    from model.checkpoint import load_pretrained
    from model.llama import Config, Transformer
    from training.distributed import shard_model
    from training.optim import build_optimizer
    from training.step import forward_backward

    model = load_pretrained(PICO) if model_name == "pico" else Transformer(Config(**SHAPE_110M))
    n = matmul_params(model)
    if mode == "lora":
        apply_lora(model, r=LORA["r"], alpha=LORA["alpha"], targets=tuple(LORA["targets"]))
    compiled = stack == "ours+compile"
    # as train.py's setup does: train.speedups (default on), then train.activation_checkpointing
    # and train.compile applied per block (no process group here, so nothing is sharded)
    speedups.apply(model, compiled=compiled)
    shard_model(model, mixed_precision=False, activation_checkpointing=stack == "ours+ckpt",
                compile=compiled)
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
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_name == "pico":
        model = LlamaForCausalLM.from_pretrained(PICO, dtype=torch.float32)
    else:
        model = LlamaForCausalLM(LlamaConfig(**SHAPE_110M, attn_implementation="sdpa"))
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


# ----------------------------------------------------------------------------- children

def say(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def child(model_name: str, mode: str, stack: str, args) -> None:
    """Build one stack; memory-only: two steps and the peak; else warm up, say ready, and run
    one timed step for every 'step' line read from stdin."""
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if stack == "hf":
        model, n, step = build_hf(model_name, mode)
    else:
        model, n, step = build_ours(model_name, mode, stack)
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast == "bf16"
           else torch.autocast("cpu", enabled=False))
    with ctx:
        if args.memory_only:
            base = reset_peak()
            for _ in range(2):
                step()
            say({"peak_mib": (rss_kib("VmHWM") - base) / 1024})
            return
        base = reset_peak()
        first = time.perf_counter()
        step()  # the first step pays for torch.compile's compilation, when there is one
        first = time.perf_counter() - first
        for _ in range((args.warmup if args.warmup >= 0 else STEPS[model_name][0]) - 1):
            step()
        say({"ready": True, "n_matmul_params": n, "first_step_s": first})
        for line in sys.stdin:
            if line.strip() == "profile":
                say(profile_step(step))
                continue
            if line.strip() != "step":
                break
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            say({"s": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                 "peak_rss_mib": (rss_kib("VmHWM") - base) / 1024})


# torch.profiler op names by kind of work: the matrix products (MKL through aten, oneDNN through
# mkldnn) and the fused attention kernels (forward and backward) do the FLOPs; "other" is the
# rest: norms, RoPE, SwiGLU, softmax of the loss, AdamW, clipping, autograd's bookkeeping
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
            "mkldnn::_linear_pointwise"}
PROFILED_STEPS = 3


def profile_step(step, steps: int = PROFILED_STEPS) -> dict:
    """`steps` steps under torch.profiler, one at a time: the median self time of each kind of
    work (GEMMs, attention, the rest), in seconds of the calling thread (intra-op threads are
    not added up), so the three add up to about a step."""
    from torch.profiler import ProfilerActivity, profile
    runs = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        kinds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
        for ev in prof.key_averages():
            kind = ("gemm" if ev.key in GEMM_OPS else
                    "attention" if "scaled_dot_product" in ev.key else "other")
            kinds[kind] += ev.self_cpu_time_total / 1e6  # microseconds -> seconds
        runs.append(kinds)
    return {kind: statistics.median(r[kind] for r in runs) for kind in runs[0]}


class Child:
    """A child process speaking the MARK protocol; its stderr goes to a temporary file."""

    def __init__(self, python: str, argv: list[str], env: dict[str, str]):
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, __file__, *argv], env=env, text=True, bufsize=1,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        self.err.seek(0)
        raise RuntimeError(f"child exited with {self.proc.returncode}:\n{self.err.read()[-2000:]}")

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()
        self.err.close()


def child_argv(model_name: str, mode: str, stack: str, args) -> list[str]:
    return ["--child", model_name, mode, stack, "--threads", str(args.threads),
            "--autocast", args.autocast, "--warmup", str(args.warmup)]


def measure(python: str, isa: str, model_name: str, mode: str, stacks: list[str], args) -> dict:
    """Per stack: step times from children taking turns, then peak live memory (see the docstring)."""
    env = {**isa_env(isa), "OMP_NUM_THREADS": str(args.threads)}
    rounds = args.steps or STEPS[model_name][1]
    children = {s: Child(python, child_argv(model_name, mode, s, args), env) for s in stacks}
    got: dict[str, dict] = {}
    try:
        for s, c in children.items():
            got[s] = {**c.read(), "s": [], "cpu": []}
        for r in range(rounds):
            for s in stacks[r % len(stacks):] + stacks[:r % len(stacks)]:
                res = children[s].ask("step")
                got[s]["s"].append(res["s"])
                got[s]["cpu"].append(res["cpu"])
                got[s]["peak_rss_mib"] = res["peak_rss_mib"]
        if args.profile:
            for s in stacks:
                got[s]["profile"] = children[s].ask("profile")
    finally:
        for c in children.values():
            c.close()
    for s in stacks:
        mem = Child(python, child_argv(model_name, mode, s, args) + ["--memory-only"],
                    {**env, "MALLOC_MMAP_THRESHOLD_": "131072"})
        try:
            got[s]["peak_mib"] = mem.read()["peak_mib"]
        finally:
            mem.close()
    return got


def gemm_rates(python: str, isa: str, threads: int) -> dict[str, float]:
    out = subprocess.run([python, __file__, "--gemm-child", "--threads", str(threads)],
                         env=isa_env(isa), capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(MARK)), None)
    if line is None:
        raise RuntimeError(f"GEMM child failed:\n{out.stderr[-2000:]}")
    return json.loads(line[len(MARK):])


def hf_available(python: str) -> bool:
    return subprocess.run([python, "-c", "import transformers, peft"], capture_output=True).returncode == 0


# ----------------------------------------------------------------------------- report

def paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i: how many times b's step is faster, load-paired."""
    return statistics.median(x / y for x, y in zip(a, b))


def report(isa: str, results: dict, gemm: dict[str, float], out: dict) -> None:
    peak_flops = max(gemm.values())
    out.update({f"matmul_gflops_torch_mm_{isa}": round(gemm["torch_mm"] / 1e9, 1),
                f"matmul_gflops_onednn_{isa}": round(gemm["onednn"] / 1e9, 1)})
    for (model_name, mode), got in results.items():
        for stack, r in got.items():
            tok_s = BATCH * SEQ / statistics.median(r["s"])
            tok_cpu = BATCH * SEQ / statistics.median(r["cpu"])
            mfu = tok_s * (6 if mode == "full" else 4) * r["n_matmul_params"] / peak_flops
            key = f"{model_name}_{mode}_{stack.replace('+', '_')}_{isa}"
            out.update({f"tokens_per_s_{key}": round(tok_s, 1), f"peak_mib_{key}": round(r["peak_mib"], 1),
                        f"mfu_{key}": round(mfu, 4)})
            print(f"[{isa}] {model_name:5s} {mode:5s} {stack:12s}: {tok_s:8.1f} tok/s "
                  f"({tok_cpu:7.1f} per CPU-s)  peak {r['peak_mib']:7.1f} MiB "
                  f"(RSS {r['peak_rss_mib']:7.1f})  MFU {100 * mfu:5.1f}%  steps "
                  + " ".join(f"{t:.2f}s" for t in r["s"]) + f"  (first step {r['first_step_s']:.1f}s)")
            if "profile" in r:
                p = r["profile"]
                out.update({f"profile_{kind}_s_{key}": round(v, 4) for kind, v in p.items()})
                print(f"[{isa}] {model_name:5s} {mode:5s} {stack:12s} profiled step (median of {PROFILED_STEPS}): GEMM "
                      f"{p['gemm']:.3f}s, attention {p['attention']:.3f}s, other {p['other']:.3f}s")
        for ours, suffix in (("ours", ""), ("ours+ckpt", "_ckpt"), ("ours+compile", "_compile")):
            if ours in got and "hf" in got:
                tr = paired(got["hf"]["s"], got[ours]["s"])
                cr = paired(got["hf"]["cpu"], got[ours]["cpu"])
                mr = got[ours]["peak_mib"] / max(got["hf"]["peak_mib"], 1e-9)
                key = f"{model_name}_{mode}{suffix}_{isa}"
                out.update({f"tokens_per_s_ratio_{key}": round(tr, 3),
                            f"tokens_per_cpu_s_ratio_{key}": round(cr, 3),
                            f"peak_mem_ratio_{key}": round(mr, 3)})
                print(f"[{isa}] {model_name:5s} {mode:5s} {ours}/hf: tokens/s x{tr:.2f} "
                      f"(per CPU-second x{cr:.2f}), peak memory x{mr:.2f}")
                if "profile" in got[ours] and "profile" in got["hf"]:
                    # the most this stack could gain if everything but its GEMMs and attention
                    # kernels cost nothing: HF's whole profiled step over those two alone
                    p = got[ours]["profile"]
                    hf_step, floor = sum(got["hf"]["profile"].values()), p["gemm"] + p["attention"]
                    out[f"ceiling_ratio_{key}"] = round(hf_step / floor, 3)
                    print(f"[{isa}] {model_name:5s} {mode:5s} {ours}/hf: ceiling x{hf_step / floor:.2f} "
                          f"(HF's step {hf_step:.3f}s over this stack's GEMM + attention {floor:.3f}s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="pico,110m")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--stacks", default="ours,ours+ckpt,ours+compile,hf",
                    help="ours, ours+ckpt (activation checkpointing per block), ours+compile "
                         "(train.compile: each block through torch.compile) and/or hf "
                         "(hf needs transformers+peft)")
    ap.add_argument("--profile", action="store_true",
                    help=f"after the timed rounds, {PROFILED_STEPS} steps per stack under torch.profiler: "
                         "seconds in GEMMs, attention and the rest, and the ceiling they set")
    ap.add_argument("--isa", default="native,avx2",
                    help="native and/or avx2 (math libraries capped to AVX2, see bench/_isa.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0,
                    help="timed rounds, one step per stack each (default: 9 pico, 3 110m)")
    ap.add_argument("--warmup", type=int, default=-1,
                    help="untimed steps first, at least 1: the first is reported apart, it pays "
                         "for compilation (default: 2 pico, 1 110m)")
    ap.add_argument("--autocast", default="none", choices=("none", "bf16"))
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "STACK"), help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gemm-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args)
    if args.gemm_child:
        return say(matmul_flops(args.threads))

    isas, stacks = parse_isas(args.isa), args.stacks.split(",")
    if "hf" in stacks and not hf_available(sys.executable):
        print("transformers/peft not importable here: measuring ours only "
              "(run with /work/parity-venv/bin/python for the comparison)")
        stacks = [s for s in stacks if s != "hf"]
    cpu = cpu_description()
    load = os.getloadavg()
    print(f"CPU: {describe_cpu(cpu)}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.threads} threads; "
          f"autocast {args.autocast}; batch {BATCH}x{SEQ}")
    out: dict = {"cpu": cpu["model_name"], "cpu_family": cpu["family"], "cpu_model": cpu["model"],
                 "cpu_flags": " ".join(cpu["flags"]), "threads": args.threads,
                 "load_avg_1m_start": round(load[0], 2)}
    t_start = time.time()
    for isa in isas:
        libs = report_isa(isa)
        out[f"isa_{isa}"] = libs
        gemm = gemm_rates(sys.executable, isa, args.threads)
        print(f"[{isa}] fp32 matmul: torch.mm {gemm['torch_mm'] / 1e9:.1f} GFLOP/s, "
              f"oneDNN {gemm['onednn'] / 1e9:.1f}")
        results = {(m, mode): measure(sys.executable, isa, m, mode, stacks, args)
                   for m in args.models.split(",") for mode in args.modes.split(",")}
        report(isa, results, gemm, out)
    out.update(load_avg_1m_end=round(os.getloadavg()[0], 2), seconds=round(time.time() - t_start))
    print(f"load average now {os.getloadavg()[0]:.2f}; {out['seconds']} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
