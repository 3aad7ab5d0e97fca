"""The first minutes on a GPU: prove the CUDA path and measure it, then one JSON line.

    python bench/gpu_proof.py --quick               # parts 1 and 4: under 2 minutes on an H100/H200
    python bench/gpu_proof.py [--parts speed,...]   # all four parts (at most ~8 minutes), or some
    python bench/gpu_proof.py --device cpu --tiny   # the CI dry run: the same code, tiny shapes
    python bench/gpu_proof.py --pack-assets DIR     # tiny shared models cut to travel (then --shared DIR)

GPU time comes rarely and in minutes, so nothing may be left to write when it comes, and code
that runs only on a GPU rots in between: CI runs this script on the CPU (tests/test_gpu_proof.py).
Nothing is downloaded: big shapes are random weights built from configs. What runs is what
train.py runs: `training.loop.setup` (tokenizer, template, packed data, `load_model` full / LoRA /
QLoRA, `model.speedups`, `distributed.shard_model`), `training.step.forward_backward`, the clip and
AdamW of the loop, and under torchrun setup / fit / finish; big shapes skip only the folder.
Each part runs in a child process under a time limit, so a CUDA error or an out-of-memory cannot
poison the next part and each peak memory is its own; children print lines for people and
`RESULT {json}` lines, merged into the final line. Sizes, shapes, anchors and the small shared
helpers are in bench/_gpu_common.py.

1. correctness: pico-base and the tiny Llama-3 / Qwen2 / Qwen3 folders: logits on the device in
   fp32 vs on the CPU (causal and packed rows); bf16 weights and bf16 autocast vs fp32 (reported).
   A folder the loader refuses (SFTError: an architecture not supported yet) is "skipped: why".
   Steps on one repeated batch of pico-base, full (bf16-mixed and bfloat16), LoRA (bf16-mixed)
   and QLoRA (bfloat16): the loss must fall. Greedy generation with the KV cache, 32 tokens for
   two prompts of different lengths (left padding): the device's tokens == the CPU's (fp32).
2. speed: a Llama-3.2-1B-shaped full fine-tuning step (bf16-mixed, packed rows of 2048 tokens),
   activation checkpointing off/on x torch.compile off/on, and HF's LlamaForCausalLM on the same
   rows when transformers is importable. MFU = tokens/s * 6N / the card's bf16 dense peak (table
   below), N = linear-layer weights (a tied head once; embedding lookups and attention's T^2 left
   out, as bench/throughput.py), tokens = non-padding positions.
3. memory: peak CUDA memory of a Llama-3.1-8B-shaped QLoRA step (NF4 base quantized tensor by tensor
   on the device, LoRA r=8 on all linears, activation checkpointing, bf16 compute) at 1 and 2 rows
   of 2048 tokens, against torchtune's 7.4 GiB.
4. fsdp: the script starts itself under `torchrun --nproc_per_node 1`, opens the process group
   (NCCL on a GPU, gloo on the CPU) and runs the loop on pico-base: 3 steps in one go, and 2 steps
   + step_2/ saved + a resumed run to step 3; the two step-3 losses must agree.

The JSON line (keys of a part that did not run or failed may be missing; its status is not):
    device, device_name, torch, mode ("quick" | "full" | "parts"), tiny, seconds
    status_correctness, status_speed, status_memory, status_fsdp: "ok" | "skipped: why" | "failed: why"
    logit_diff_fp32      {model: max |logit difference|, device vs CPU, fp32; or "skipped: why"}
    logit_diff_bf16      {model: the same, bf16 weights vs fp32 on the device}
    logit_diff_autocast  {model: the same, bf16 autocast vs fp32 on the device}
    top1_agree_bf16      {model: share of positions where bf16's argmax is fp32's}
    train_loss           {"full/bf16-mixed" | "full/bfloat16" | "lora/bf16-mixed" | "qlora/bfloat16":
                          [first, last] loss on the repeated batch}
    generate_equal       true when every token matched; generate_first_mismatch [row, token] or null
    speed_shape, speed_rows_x_seq, peak_tflops (null: unknown card or CPU), peak_note
    speed_tokens_per_s   {"eager" | "ckpt" | "hf" | "compile" | "ckpt+compile": tokens/s}
    speed_mfu, speed_peak_gib  {the same keys: MFU or null; GiB allocated at the peak}
    speed_vs_hf          ours eager / HF eager tokens/s
    qlora_8b             {"batch1" | "batch2": {"peak_gib", "reserved_gib", "step_s", "loss"}}
    qlora_8b_weights_gib, qlora_8b_build_s, nf4_bits_per_param, qlora_8b_anchor_gib
    fsdp_backend, fsdp_world_size, fsdp_sharded (FSDP2 DTensor parameters seen), fsdp_losses_whole,
    fsdp_losses_resumed, fsdp_resume_diff
GiB = 2^30 bytes, from torch.cuda.max_memory_allocated / max_memory_reserved; null on the CPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench._gpu_common import (FAMILIES, FP32_RTOL, GPU, PACKED_VOCAB, PARTS, PEAK_BF16_TFLOPS,  # noqa: E402
                               PICO, QLORA_8B_ANCHOR_GIB, QUICK, SHAPES, TIME_LIMIT_S, TINY, Sizes,
                               cuda_gib, emit, packed_rows, run_config, sync, verdict)
from model.errors import SFTError  # noqa: E402
from model.llama import Config as Shape  # noqa: E402
from model.llama import Transformer  # noqa: E402


# ----------------------------------------------------------------------------- 1: correctness


def logits_on(model: nn.Module, rows: dict, dev: torch.device, autocast: bool = False) -> torch.Tensor:
    """(2, B, T, V) fp32 CPU logits: the rows read as plain causal text, then as packed samples."""
    b = {k: v.to(dev) for k, v in rows.items()}
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        causal = model(b["input_ids"])
        packed = model(b["input_ids"], position_ids=b["position_ids"], seq_ids=b["seq_ids"])
    return torch.stack([causal, packed]).float().cpu()


def compare_logits(folder: Path, dev: torch.device, tokens: int) -> dict[str, float]:
    from model.checkpoint import load_pretrained
    if not folder.is_dir():
        raise SFTError(f"{folder} not found (pass --shared DIR or set SFT_SHARED_DIR)")
    cpu = load_pretrained(folder)  # an architecture the loader does not know raises SFTError here
    rows = packed_rows(cpu.config.vocab_size, 2, tokens)
    ref = logits_on(cpu, rows, torch.device("cpu"))
    fp32 = load_pretrained(folder, device=dev)
    on_dev, autocast = logits_on(fp32, rows, dev), logits_on(fp32, rows, dev, autocast=True)
    del cpu, fp32
    bf16 = logits_on(load_pretrained(folder, dtype=torch.bfloat16, device=dev), rows, dev)
    return {"fp32": (on_dev - ref).abs().max().item(), "scale": ref.abs().max().item(),
            "bf16": (bf16 - on_dev).abs().max().item(), "autocast": (autocast - on_dev).abs().max().item(),
            "top1": (bf16.argmax(-1) == on_dev.argmax(-1)).float().mean().item()}


def train_on_one_batch(finetune: str, dtype: str, dev: torch.device, sizes: Sizes, out: str) -> list[float]:
    """Losses of `train_steps` optimizer steps on the same two rows of a run built by setup()."""
    from training import distributed as D
    from training.loop import setup
    from training.step import forward_backward, to_device, trainable_tokens
    cfg = run_config(out, dev, sizes, f"model.finetune={finetune}", f"model.dtype={dtype}",
                     f"run.name={finetune}-{dtype}", f"train.max_steps={sizes.train_steps}",
                     "optim.lr=1e-3", "lora.targets=['all-linear']")
    run = setup(cfg)
    batch = to_device(run.data.train, list(range(min(2, run.data.n_train))), dev)
    n = trainable_tokens(batch)
    params = [p for p in run.model.parameters() if p.requires_grad]
    losses = []
    for _ in range(sizes.train_steps):
        with run.amp():
            losses.append(forward_backward(run.model, [batch], 1.0 / n, cfg.train.loss_chunk) / n)
        D.clip_grad_norm(params, cfg.optim.grad_clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.metrics.close()
    return losses


def greedy(dev: torch.device, prompts: list[list[int]]) -> list[list[int]]:
    from model.checkpoint import load_pretrained
    return load_pretrained(PICO, device=dev).generate(prompts, max_new_tokens=32, stop_ids=[])  # all 32


def correctness(args, dev: torch.device, sizes: Sizes) -> dict:
    problems, diffs = [], {k: {} for k in ("fp32", "bf16", "autocast", "top1")}
    for folder in [PICO] + [Path(args.shared) / "models" / name for name in FAMILIES]:
        try:
            d = compare_logits(folder, dev, sizes.logit_tokens)
        except SFTError as e:
            diffs["fp32"][folder.name] = f"skipped: {e}"
            print(f"{folder.name:20s} skipped: {e}")
            continue
        for k in diffs:
            diffs[k][folder.name] = round(d[k], 6)
        ok = d["fp32"] <= FP32_RTOL * max(1.0, d["scale"])
        print(f"{folder.name:20s} fp32 {dev.type} vs cpu: max |diff| {d['fp32']:.2e} (logits up to "
              f"{d['scale']:.1f}) {'ok' if ok else 'TOO LARGE'}; bf16 weights {d['bf16']:.3f}, "
              f"autocast {d['autocast']:.3f}, top-1 agreement {d['top1']:.3f}")
        if not ok:
            problems.append(f"{folder.name} fp32 logits differ by {d['fp32']:.2e}")
    emit(logit_diff_fp32=diffs["fp32"], logit_diff_bf16=diffs["bf16"], logit_diff_autocast=diffs["autocast"],
         top1_agree_bf16=diffs["top1"])
    losses = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in ("full/bf16-mixed", "full/bfloat16", "lora/bf16-mixed", "qlora/bfloat16"):
            try:
                got = train_on_one_batch(*mode.split("/"), dev, sizes, out)
            except Exception as e:  # noqa: BLE001 - one mode failing must not hide the others
                traceback.print_exc()
                problems.append(f"{mode} raised {type(e).__name__}: {str(e)[:200]}")
                continue
            losses[mode] = [round(got[0], 4), round(got[-1], 4)]
            falls = all(map(math.isfinite, got)) and got[-1] < got[0]
            print(f"{mode:18s} loss on a repeated batch: {' '.join(f'{x:.3f}' for x in got)}"
                  + ("" if falls else "  DOES NOT FALL"))
            if not falls:
                problems.append(f"{mode} loss does not fall: {got[0]:.4f} -> {got[-1]:.4f}")
    emit(train_loss=losses)
    from data.chat import chat_for
    from model.tokenizer import Tokenizer
    chat = chat_for(PICO, Tokenizer.from_pretrained(PICO))
    prompts = [chat.prompt_ids([{"role": "user", "content": text}])
               for text in ("Write a short story about a cat who finds a key.", "Name a colour.")]
    want, got = greedy(torch.device("cpu"), prompts), greedy(dev, prompts)
    mismatch = next(([r, i] for r, (a, b) in enumerate(zip(want, got)) for i, (x, y) in enumerate(zip(a, b))
                     if x != y), None)
    equal = mismatch is None and want == got
    print(f"greedy generation with the KV cache, 2 prompts x 32 tokens: {dev.type} "
          f"{'equals' if equal else 'DIFFERS FROM'} cpu" + (f" at (row, token) {mismatch}" if mismatch else ""))
    if not equal:
        problems.append(f"generation differs from the CPU's at (row, token) {mismatch}")
    emit(generate_equal=equal, generate_first_mismatch=mismatch)
    return verdict("correctness", problems)

# ----------------------------------------------------------------------------- 2 and 3: speed, memory


def random_model(shape: Shape, dev: torch.device, dtype: torch.dtype, nf4: bool = False) -> Transformer:
    """A random-weight model built on `dev`. With nf4 every linear but the head is quantized the
    moment its weight exists (on the meta skeleton), so no full-precision copy of the model does."""
    if not nf4:
        with torch.device(dev):
            return Transformer(shape).to(dtype)
    from model.nf4 import Linear4bit
    with torch.device("meta"):
        model = Transformer(shape)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                w = torch.empty(child.weight.shape, device=dev, dtype=dtype).normal_(0, 0.02)
                setattr(parent, name, Linear4bit(w, compute_dtype=dtype))
                del w
    for module in model.modules():  # still on meta: embedding, norms (ones), head
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                value = torch.empty(p.shape, device=dev, dtype=dtype)
                setattr(module, name, nn.Parameter(value.normal_(0, 0.02) if p.dim() > 1 else value.fill_(1.0)))
    if shape.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def linear_weights(model: nn.Module) -> int:
    """N of the 6N rule: weights of the linear layers, a tied head once, no embedding lookup."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def our_step(model: nn.Module, autocast: bool):
    """step(batch) -> loss: one optimizer step as fit() takes it (forward_backward, clip, AdamW)."""
    from training import distributed as D
    from training.optim import build_optimizer
    from training.step import forward_backward, trainable_tokens
    opt = build_optimizer(model, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: dict) -> float:
        n = trainable_tokens(batch)
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = forward_backward(model, [batch], 1.0 / n, 0) / n
        D.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def hf_step(shape: Shape, dev: torch.device):
    """HF's LlamaForCausalLM step, bf16 autocast, fused AdamW (the Trainer's default). Its SDPA
    path does not isolate packed samples from position_ids alone (transformers 5.24: a sample
    sees the one before it), so it gets the block-diagonal mask as a 4-D mask: the same work."""
    import transformers  # optional comparison, never a project dependency

    from model.llama import block_causal_mask
    transformers.logging.set_verbosity_error()
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**shape.to_hf(), attn_implementation="sdpa")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)

    def step(b: dict) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                         attention_mask=block_causal_mask(b["seq_ids"]), labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, linear_weights(model)


def timed(step, batch: dict, dev: torch.device, sizes: Sizes) -> tuple[float, float | None]:
    """Seconds per step over `timed` steps after `warmup` ones, and the peak GiB meanwhile."""
    for _ in range(sizes.warmup):
        step(batch)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(sizes.timed):
        step(batch)
    sync(dev)
    return (time.perf_counter() - t0) / sizes.timed, cuda_gib(dev)


def peak_flops(dev: torch.device) -> tuple[float | None, str]:
    if dev.type != "cuda":
        return None, "no MFU on the CPU"
    name = torch.cuda.get_device_name(dev)
    tflops = next((t for piece, t in PEAK_BF16_TFLOPS if piece in name), None)
    if tflops is None:
        return None, f"{name}: bf16 peak unknown (add it to PEAK_BF16_TFLOPS); MFU null"
    return tflops * 1e12, f"{name}: bf16 dense peak {tflops:g} TFLOP/s"


def speed(args, dev: torch.device, sizes: Sizes) -> dict:
    from model import speedups
    from training import distributed as D
    name = "tiny" if args.tiny else "llama-3.2-1b"
    shape = Shape(**SHAPES[name])
    batch = {k: v.to(dev) for k, v in packed_rows(shape.vocab_size, sizes.speed_rows, sizes.seq).items()}
    tokens = int((batch["seq_ids"] >= 0).sum())  # non-padding positions
    peak, note = peak_flops(dev)
    emit(speed_shape=name, speed_rows_x_seq=[sizes.speed_rows, sizes.seq], peak_tflops=peak and peak / 1e12,
         peak_note=note)
    print(f"speed: {name}-shaped full fine-tuning, bf16-mixed, {sizes.speed_rows} x {sizes.seq} packed "
          f"tokens ({tokens} not padding); {note}")
    tok_s, mfu, mem, problems = {}, {}, {}, []
    for label, ckpt, compiled in (("eager", False, False), ("ckpt", True, False), ("hf", False, False),
                                  ("compile", False, True), ("ckpt+compile", True, True)):
        step = model = None
        try:
            if compiled and args.tiny:
                print(f"{label:13s} skipped: --tiny (inductor's first compile takes minutes on a CPU)")
                continue
            if label == "hf":
                step, n = hf_step(shape, dev)
            else:
                torch.manual_seed(0)
                model = random_model(shape, dev, torch.float32)  # bf16-mixed: fp32 master weights
                n = linear_weights(model)
                speedups.apply(model, compiled=compiled)  # as setup() does (train.speedups = true)
                D.shard_model(model, mixed_precision=True, activation_checkpointing=ckpt, compile=compiled)
                step = our_step(model.train(), autocast=True)
            seconds, mem[label] = timed(step, batch, dev, sizes)
        except ImportError as e:
            print(f"{label:13s} skipped: transformers not importable ({e})")
            continue
        except Exception as e:  # noqa: BLE001 - report, then the next configuration
            traceback.print_exc()
            problems.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
            continue
        finally:
            step = model = None  # free this configuration's weights and compiled code
            gc.collect()
            if "torch._dynamo" in sys.modules:  # (importing it just to reset it costs seconds)
                torch._dynamo.reset()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        tok_s[label] = round(tokens / seconds, 1)
        mfu[label] = round(tokens / seconds * 6 * n / peak, 4) if peak else None
        print(f"{label:13s} {tok_s[label]:10,.0f} tok/s  step {seconds:.3f}s  MFU "
              + ("-" if mfu[label] is None else f"{100 * mfu[label]:.1f}%")
              + ("" if mem[label] is None else f"  peak {mem[label]} GiB"))
        emit(speed_tokens_per_s=tok_s, speed_mfu=mfu, speed_peak_gib=mem)
    if "eager" in tok_s and "hf" in tok_s:
        emit(speed_vs_hf=round(tok_s["eager"] / tok_s["hf"], 3))
        print(f"ours eager / HF: x{tok_s['eager'] / tok_s['hf']:.2f} tokens/s")
    return verdict("speed", problems)


def memory(args, dev: torch.device, sizes: Sizes) -> dict:
    from lora import apply_lora
    from model import speedups
    from model.nf4 import nf4_bits_per_param
    from training import distributed as D
    shape = Shape(**SHAPES["tiny" if args.tiny else "llama-3.1-8b"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = random_model(shape, dev, torch.bfloat16, nf4=True)  # QLoRA with model.dtype = "bfloat16"
    sync(dev)
    build_s = time.perf_counter() - t0
    apply_lora(model, r=8, alpha=16, targets="all-linear")
    speedups.apply(model)
    D.shard_model(model, mixed_precision=False, activation_checkpointing=True)
    weights, bits = cuda_gib(dev, "memory_allocated"), nf4_bits_per_param(model)
    print(f"memory: {'tiny' if args.tiny else 'Llama-3.1-8B'}-shaped QLoRA (NF4 {bits:.3f} bits/param, built in "
          f"{build_s:.0f}s), LoRA r=8 on all linears, activation checkpointing; weights {weights} GiB")
    emit(qlora_8b_weights_gib=weights, qlora_8b_build_s=round(build_s, 1), nf4_bits_per_param=round(bits, 4),
         qlora_8b_anchor_gib=QLORA_8B_ANCHOR_GIB)
    step, out = our_step(model.train(), autocast=False), {}
    for rows in (1, 2):
        batch = {k: v.to(dev) for k, v in packed_rows(shape.vocab_size, rows, sizes.seq, seed=rows).items()}
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        losses = [step(batch) for _ in range(2)]  # the first step of all also makes the AdamW state
        sync(dev)
        r = out[f"batch{rows}"] = {
            "peak_gib": cuda_gib(dev), "reserved_gib": cuda_gib(dev, "max_memory_reserved"),
            "step_s": round((time.perf_counter() - t0) / 2, 3), "loss": round(losses[-1], 4)}
        print(f"{rows} x {sizes.seq} tokens: peak {r['peak_gib']} GiB allocated ({r['reserved_gib']} reserved), "
              f"{r['step_s']}s/step; torchtune's figure {QLORA_8B_ANCHOR_GIB} GiB (batch 2, RTX 4090)")
        emit(qlora_8b=out)
    return verdict("memory", [])

# ----------------------------------------------------------------------------- 4: FSDP2 under torchrun


def fsdp(args, dev: torch.device, sizes: Sizes) -> dict:
    """In the torchrun child: open the group, then the loop, in one go and stopped + resumed."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from training import distributed as D
    from training.loop import finish, fit, setup
    if dev.type == "cuda":  # one GPU per process: LOCAL_RANK's
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():  # init_distributed opens a group for 2+ processes only
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    world, losses, sharded = dist.get_world_size(), {}, False
    with tempfile.TemporaryDirectory() as out:
        base = ("model.dtype=bf16-mixed", "train.max_steps=3", "run.save_every=2")
        for name, extra, stop in (("whole", (), None), ("resumed", (), 2), ("resumed", ("run.resume=true",), None)):
            run = setup(run_config(out, dev, sizes, *base, f"run.name={name}", *extra))
            sharded = sharded or any(isinstance(p, DTensor) for p in run.model.parameters())
            fit(run, stop_after=stop)
            finish(run)
            losses[name] = {r["step"]: r["loss"] for r in run.metrics.records if r.get("kind") == "train"}
    D.teardown(clean=True)
    whole, resumed = losses["whole"], losses["resumed"]
    diff = abs(whole[3] - resumed.get(3, math.inf))
    print(f"fsdp: {backend}, {world} process(es); losses in one go {[round(x, 4) for x in whole.values()]}, "
          f"stopped at 2 and resumed {[round(x, 4) for x in resumed.values()]}; step 3 differs by {diff:.2e}")
    if not sharded:
        print("fsdp: NOTE the model was not sharded (distributed.shard_model applies FSDP2 to 2+ "
              "processes only); the group, its collectives, the checkpoint and the resume ran")
    return {"fsdp_backend": backend, "fsdp_world_size": world, "fsdp_sharded": sharded,
            "fsdp_losses_whole": list(whole.values()), "fsdp_losses_resumed": list(resumed.values()),
            "fsdp_resume_diff": diff,
            **verdict("fsdp", [] if diff <= 1e-3 else [f"step 3 after resuming differs by {diff:.2e}"])}

# ----------------------------------------------------------------------------- the parent


def child_command(part: str, args) -> list[str]:
    flags = ["--device", args.device, "--shared", str(args.shared)] + (["--tiny"] if args.tiny else [])
    if part == "fsdp":  # torchrun is `python -m torch.distributed.run`; one node, a port the store picks
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--nnodes", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__, "--part", part, *flags]
    return [sys.executable, __file__, "--part", part, *flags]


def run_part(part: str, args, results: dict) -> None:
    """One part in a child under its time limit: echo its lines, merge its RESULT lines."""
    proc = subprocess.Popen(child_command(part, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("RESULT "):
                results.update(json.loads(line[len("RESULT "):]))
            else:
                print("  " + line, end="", flush=True)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=TIME_LIMIT_S[part])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's whole session (torchrun's worker too)
        proc.wait()
        results[f"status_{part}"] = f"failed: timed out after {TIME_LIMIT_S[part]}s"
    reader.join(timeout=10)
    results.setdefault(f"status_{part}", f"failed: exit status {proc.returncode}")


def child(args) -> None:
    """One part in this process: its RESULT lines, then its status (an exception is reported)."""
    dev, sizes = torch.device(args.device), TINY if args.tiny else GPU
    if args.tiny and dev.type == "cpu":  # the dry run shares small CI machines: 2 spinning OpenMP
        torch.set_num_threads(1)         # threads on a busy 2-core box made it 10x slower
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 (no TF32) in the comparisons
    part = {"correctness": correctness, "speed": speed, "memory": memory, "fsdp": fsdp}[args.part]
    try:
        status = part(args, dev, sizes)
    except Exception as e:  # noqa: BLE001 - the parent reports it and runs the next part
        traceback.print_exc()
        status = verdict(args.part, [f"{type(e).__name__}: {str(e)[:300]}"])
    if int(os.environ.get("RANK", "0")) == 0:
        emit(**status)


def ids_below(value: int | list[int] | None, n: int) -> int | list[int] | None:
    """A special-token id, or list of ids, without those >= n; null when none is left."""
    kept = [i for i in ([value] if isinstance(value, int) else value or []) if i < n]
    return None if not kept else kept[0] if isinstance(value, int) else kept


def pack_assets(args) -> None:
    """Copy config.json + weights of each tiny shared model with only the first PACKED_VOCAB
    vocabulary rows (embedding, untied head), so all three travel with the repository. Special
    token ids past the cut become null (a loader may check them against vocab_size)."""
    from model.files import atomic_write_json, read_json
    from model.safetensors import load_sharded, save_file
    for name in FAMILIES:
        src, dst = Path(args.shared) / "models" / name, Path(args.pack_assets) / "models" / name
        cfg = read_json(src / "config.json", "config.json")
        tensors = {k: t[:PACKED_VOCAB].clone() if t.shape[0] == cfg["vocab_size"] else t
                   for k, t in load_sharded(src).items()}
        dst.mkdir(parents=True, exist_ok=True)
        save_file(tensors, dst / "model.safetensors")
        ids = {k: ids_below(v, PACKED_VOCAB) for k, v in cfg.items() if k.endswith("_token_id")}
        atomic_write_json(dst / "config.json", {**cfg, **ids, "vocab_size": PACKED_VOCAB})
        print(f"{src} -> {dst} (vocabulary {cfg['vocab_size']} -> {PACKED_VOCAB} rows)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run of CI)")
    ap.add_argument("--quick", action="store_true", help="parts correctness and fsdp only")
    ap.add_argument("--parts", default="", help=f"comma-separated, from {','.join(PARTS)}")
    ap.add_argument("--shared", default=os.environ.get("SFT_SHARED_DIR", str(ROOT.parent / "shared")),
                    help="folder holding models/tiny-random-* (default: $SFT_SHARED_DIR, else ../shared)")
    ap.add_argument("--pack-assets", metavar="DIR", help="write small copies of the tiny shared models to DIR")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        return child(args)
    if args.pack_assets:
        return pack_assets(args)
    parts = [p for p in args.parts.split(",") if p] or list(QUICK if args.quick else PARTS)
    if set(parts) - set(PARTS):
        raise SystemExit(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; choose from {','.join(PARTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu (with --tiny for the dry run)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {"device": args.device, "device_name": name, "torch": torch.__version__,
               "mode": "parts" if args.parts else "quick" if args.quick else "full", "tiny": args.tiny}
    print(f"{name}, torch {torch.__version__}; parts: {', '.join(parts)}")
    t0 = time.perf_counter()
    for part in PARTS:
        if part not in parts:
            results[f"status_{part}"] = "skipped: not asked for (--quick or --parts)"
            continue
        print(f"--- {part}")
        run_part(part, args, results)
        print(f"--- {part}: {results[f'status_{part}']}")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
