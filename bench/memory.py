"""Peak memory of one training step on CPU: full fine-tuning vs LoRA vs QLoRA (NF4 base).

    python bench/memory.py              # pico-base + 110M-shaped Llama, then the 7B and 8B QLoRA steps
    python bench/memory.py --no-7b      # the quick part only (a few minutes less)
    python bench/memory.py --only-8b    # just the Llama-3-8B-shaped QLoRA step
    python bench/memory.py --merge-export [--export-shape 110m]   # saving a merged QLoRA model

What is measured. Each (model, mode) runs in a fresh subprocess, so one run's freed memory
cannot hide another's peak. The child builds the model, applies LoRA (r=8, alpha=16, all
linear layers but the head), runs ONE step (forward, chunked masked loss, backward, AdamW on the
trainable parameters) on a fixed random batch, and reports the kernel's peak resident set size
of the whole process (VmHWM: Python + torch + weights + gradients + optimizer state +
activations), next to the size right after `import torch` (the floor every run pays).
All memory figures, including the JSON keys ending in `_gb`, are GiB (2^30 bytes).

Models. pico-base (checkpoints/, loaded from disk; QLoRA loads it through the NF4 hook) and a
"110M"-shaped Llama (hidden 768, 12 layers, 12 heads, FFN 2048, vocab 32000) with random
weights, compute in fp32. Then a Llama-2-7B-shaped model (hidden 4096, 32 layers, 32 heads,
FFN 11008, vocab 32000) for QLoRA only: its random weights are generated one matrix at a time and
quantized to NF4 as they are made, so the full-precision model never exists; embeddings, norms
and head in bf16, LoRA in fp32, batch 1 x 256 tokens. Activation checkpointing per block is
available (--checkpointing) but off: at 1 x 256 tokens the activations are small next to the
3.4 GB of NF4 weights, and recomputing would dequantize every weight a third time.
Then a Llama-3-8B-shaped model (Llama-3.1-8B: hidden 4096, 32 layers, 32 heads / 8 KV heads, FFN
14336, vocab 128256, untied head, llama3 rope scaling), QLoRA in the same way: its two
128k x 4096 matrices, the embedding and the head (kept out of NF4, as in QLoRA), cost 1 GiB each
in bf16 and are filled a slice of rows at a time, so no fp32 copy of them exists either.

Merged export (--merge-export). A QLoRA model of the given shape (NF4 base, bf16 embeddings,
LoRA on all linears but the head with a non-zero update) is written as a full bf16 HF
checkpoint in two ways, each in its own child: `lora.save_merged` (streams: one merged weight at
a time) and `lora.merge_lora` followed by `save_pretrained` (the whole merged model in memory).
The kernel's peak RSS counter is reset (/proc/self/clear_refs) just before the export, so the
figure is the export's own peak, not the build's; `_over_model_gb` is that peak minus the RSS
of the built model just before exporting. (With --export-shape 7b the in-memory child needs
~17 GiB: the 13.5 GB merged bf16 model plus the NF4 one; the streamed one stays near 4.6.)

Storage: bits per parameter of the NF4 linears = (packed codes + 8-bit absmax + fp32 second
level scales + offset) / parameters, expected 4 + 8/64 + 32/(64*256) = 4.127.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "110m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=2048),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, max_position_embeddings=4096),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
               rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
BIG = {"7b": "Llama-2-7B", "8b": "Llama-3-8B"}  # the QLoRA-only shapes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _randn(shape, dtype, rows: int = 4096):
    """N(0, 0.02) of `shape` in `dtype`, drawn in fp32 a slice of rows at a time."""
    import torch
    out = torch.empty(shape, dtype=dtype)
    for i in range(0, shape[0], rows):
        out[i:i + rows] = torch.randn(out[i:i + rows].shape) * 0.02
    return out


def build_random(shape: str, mode: str, dtype):
    """A random-weight Llama built module by module; with mode=qlora every linear but the head
    is quantized the moment its weight exists (the meta device holds the skeleton meanwhile)."""
    import torch
    from torch import nn

    from model.llama import Config, RMSNorm, Transformer
    from model.nf4 import Linear4bit
    torch.manual_seed(0)
    cfg = Config(**SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(cfg)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and (name == "lm_head" or mode != "qlora"):
                child.weight = nn.Parameter(_randn((child.out_features, child.in_features), dtype))
            elif isinstance(child, nn.Linear):  # quantized the moment it exists; fp32 dropped
                setattr(parent, name, Linear4bit(torch.randn(child.out_features, child.in_features) * 0.02,
                                                 compute_dtype=dtype))
            elif isinstance(child, nn.Embedding):
                child.weight = nn.Parameter(_randn(child.weight.shape, dtype))
            elif isinstance(child, RMSNorm):
                child.weight = nn.Parameter(torch.ones(child.weight.shape, dtype=dtype))
    return model


def run_one(spec: dict) -> dict:
    """In the child: build, (quantize,) apply LoRA, one step; return the measured figures."""
    import torch
    torch.set_num_threads(spec["threads"])
    base_kib = _status_kib("VmRSS")
    sys.path.insert(0, str(ROOT))
    import lora
    from model import load_pretrained
    from model.loss import masked_ce_sum
    from model.nf4 import load_quantized, nf4_bits_per_param
    dtype = getattr(torch, spec["dtype"])
    t0 = time.time()
    if spec["model"] == "pico":
        folder = ROOT / "checkpoints" / "pico-base"
        model = load_quantized(folder, dtype) if spec["mode"] == "qlora" else load_pretrained(folder, dtype)
    else:
        model = build_random(spec["model"], spec["mode"], dtype)
    build_s = time.time() - t0
    model_kib = _status_kib("VmRSS")
    if spec["mode"] != "full":
        lora.apply_lora(model, r=8, alpha=16, targets="all-linear")
    if spec["checkpointing"]:
        from training.distributed import checkpoint_blocks
        checkpoint_blocks(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=g)
    t0 = time.time()
    loss, n = masked_ce_sum(model, model(x, return_hidden=True), x)
    (loss / n).backward()
    opt.step()
    step_s = time.time() - t0
    return {
        "peak_rss_gb": _status_kib("VmHWM") / 1024**2, "torch_import_rss_gb": base_kib / 1024**2,
        "after_build_rss_gb": model_kib / 1024**2, "build_s": build_s, "step_s": step_s,
        "loss": (loss / n).item(), "trainable_m": sum(p.numel() for p in params) / 1e6,
        "nf4_bits_per_param": nf4_bits_per_param(model) if spec["mode"] == "qlora" else None,
    }


def run_export(spec: dict) -> dict:
    """In the child: build a QLoRA model, then export it merged, streaming or in memory."""
    import tempfile

    import torch
    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(ROOT))
    import lora
    from model.checkpoint import save_pretrained
    model = build_random(spec["model"], "qlora", torch.bfloat16)
    lora.apply_lora(model, r=8, alpha=16, targets="all-linear")
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.01)
    before_kib = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")    # VmHWM := VmRSS: measure the export alone
    with tempfile.TemporaryDirectory(dir=spec.get("tmp")) as d:
        t0 = time.time()
        if spec["mode"] == "stream":
            lora.save_merged(model, Path(d) / "merged")
        else:
            save_pretrained(lora.merge_lora(model), Path(d) / "merged")
        export_s = time.time() - t0
        file_gb = sum(f.stat().st_size for f in (Path(d) / "merged").iterdir()) / 1024**3
    peak_kib = _status_kib("VmHWM")
    return {"peak_rss_gb": peak_kib / 1024**2, "before_export_rss_gb": before_kib / 1024**2,
            "over_model_gb": (peak_kib - before_kib) / 1024**2, "export_s": export_s, "file_gb": file_gb}


def merge_export(args) -> dict:
    """Peak RSS of saving a merged QLoRA model: streamed (save_merged) vs merged in memory."""
    out: dict = {"export_shape": args.export_shape}
    print(f"saving a merged QLoRA {args.export_shape}-shaped model as a bf16 HF checkpoint; "
          "peak RSS during the export in GiB")
    for mode, key in (("stream", "merged_export"), ("in_memory", "in_memory_merge")):
        r = spawn(dict(model=args.export_shape, mode=mode, threads=args.threads, export=True))
        print(f"{mode:9s}: peak RSS {r['peak_rss_gb']:6.3f} GiB = model before export "
              f"{r['before_export_rss_gb']:.3f} + {r['over_model_gb']:.3f}; wrote {r['file_gb']:.3f} GiB "
              f"in {r['export_s']:.1f}s")
        out[f"{key}_peak_rss_gb"] = round(r["peak_rss_gb"], 3)
        out[f"{key}_over_model_gb"] = round(r["over_model_gb"], 3)
        out[f"{key}_s"] = round(r["export_s"], 1)
    out["merged_file_gb"] = round(r["file_gb"], 3)
    return out


def spawn(spec: dict) -> dict:
    # A fixed glibc mmap threshold: every allocation above 128 KiB gets its own mapping, returned
    # to the kernel when freed. With glibc's default (a threshold that grows as big blocks are
    # freed), freed activations linger in the heap, and the peak RSS of the same run varied by
    # up to 1 GB from one launch to the next.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    # `-m bench.memory` from the repo root: the child's sys.path starts at the root, not at bench/,
    # whose tokenize.py would shadow the standard library's (which `import torch` needs)
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--one", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-7b", action="store_true", help="skip the Llama-2-7B-shaped QLoRA step")
    ap.add_argument("--only-7b", action="store_true", help="run only the 7B QLoRA step")
    ap.add_argument("--no-8b", action="store_true", help="skip the Llama-3-8B-shaped QLoRA step")
    ap.add_argument("--only-8b", action="store_true", help="run only the 8B QLoRA step")
    ap.add_argument("--checkpointing", action="store_true",
                    help="activation checkpointing per block for the 7B/8B steps (not needed at 1 x 256)")
    ap.add_argument("--merge-export", action="store_true",
                    help="instead: peak RSS of saving a merged QLoRA model, streamed vs in memory")
    ap.add_argument("--export-shape", choices=sorted(SHAPES), default="110m")
    args = ap.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_export(spec) if spec.get("export") else run_one(spec)))
        return
    if args.merge_export:
        print(json.dumps(merge_export(args)))
        return
    out: dict = {"batch": args.batch, "seq": args.seq, "threads": args.threads}
    runs = [] if args.only_7b or args.only_8b else [(m, mode) for m in ("pico", "110m") for mode in ("full", "lora", "qlora")]
    print(f"one training step, {args.threads} threads, LoRA r=8 on all linear layers but the head; "
          "memory as peak resident set size in GiB (2^30 bytes)")
    if runs:
        print(f"batch {args.batch} x {args.seq} tokens, fp32 compute:")
    for model_name, mode in runs:
        r = spawn(dict(model=model_name, mode=mode, dtype="float32", batch=args.batch, seq=args.seq,
                       threads=args.threads, checkpointing=False))
        bits = f"  NF4 {r['nf4_bits_per_param']:.4f} bits/param" if r["nf4_bits_per_param"] else ""
        print(f"{model_name:5s} {mode:5s}: peak RSS {r['peak_rss_gb']:6.3f} GiB (after import torch "
              f"{r['torch_import_rss_gb']:.3f}, after build {r['after_build_rss_gb']:.3f}), "
              f"trainable {r['trainable_m']:7.2f}M, step {r['step_s']:5.1f}s{bits}")
        out[f"{model_name}_{mode}_peak_rss_gb"] = round(r["peak_rss_gb"], 3)
        if r["nf4_bits_per_param"]:
            out[f"{model_name}_nf4_bits_per_param"] = round(r["nf4_bits_per_param"], 4)
    big = [b for b in BIG if not (b == "7b" and args.no_7b or b == "8b" and args.no_8b
                                  or args.only_7b and b != "7b" or args.only_8b and b != "8b")]
    for b in BIG:
        out[f"qlora_{b}_peak_rss_gb"] = None
    for b in big:
        r = spawn(dict(model=b, mode="qlora", dtype="bfloat16", batch=1, seq=256,
                       threads=args.threads, checkpointing=args.checkpointing))
        print(f"{b}    qlora{' +ckpt' if args.checkpointing else ''} ({BIG[b]}-shaped): peak RSS "
              f"{r['peak_rss_gb']:6.3f} GiB (after build {r['after_build_rss_gb']:.3f}; "
              f"built + quantized in {r['build_s']:.0f}s), one step at 1 x 256 in {r['step_s']:.0f}s, "
              f"trainable {r['trainable_m']:.1f}M, NF4 {r['nf4_bits_per_param']:.4f} bits/param, "
              f"loss {r['loss']:.3f}; target <= 8 GiB: {'met' if r['peak_rss_gb'] <= 8 else 'MISSED'}")
        out.update({f"qlora_{b}_peak_rss_gb": round(r["peak_rss_gb"], 3), f"qlora_{b}_step_s": round(r["step_s"], 1),
                    f"qlora_{b}_build_s": round(r["build_s"], 1),
                    f"nf4_{b}_bits_per_param": round(r["nf4_bits_per_param"], 4)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
