"""What every part of bench/gpu_proof.py shares: its sizes, shapes, anchors and small helpers.

gpu_proof.py runs each part in a child process of itself and merges the `RESULT {json}` lines
the children print (`emit`); the constants here say how much work a part does on a GPU and in
the CPU dry run (`Sizes`), which shapes are measured (config.json values) and the published
figures a result is read against (bf16 peaks, torchtune's 8B QLoRA memory).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data.packing import collate, pack
from model.loss import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("correctness", "speed", "memory", "fsdp")
QUICK = ("correctness", "fsdp")
TIME_LIMIT_S = {"correctness": 110, "speed": 250, "memory": 120, "fsdp": 80}  # in all < one 10-min call
PICO = ROOT / "checkpoints" / "pico-base"
DATA = ROOT / "data" / "quickstart" / "alpaca_300.jsonl"
FAMILIES = ("tiny-random-llama3", "tiny-random-qwen2", "tiny-random-qwen3")
PACKED_VOCAB = 4096         # --pack-assets keeps these embedding rows: 3 folders in ~2 MB, not 85
FP32_RTOL = 1e-4            # device vs CPU fp32 logits, relative to the largest |logit|
QLORA_8B_ANCHOR_GIB = 7.4   # torchtune: Llama-3.1-8B QLoRA on an RTX 4090 (batch 2 packed to 2048)
# bf16 dense tensor-core peak, TFLOP/s (NVIDIA datasheets, no sparsity), by a piece of
# torch.cuda.get_device_name(), first match wins. The H200 has the H100 SXM's compute.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("RTX 4090", 165.2))
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {  # config.json values of the measured shapes
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         rope_scaling={**LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                 max_position_embeddings=4096, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class Sizes:
    """How much work each part does: real shapes on a GPU, tiny ones for the CPU dry run."""
    logit_tokens: int   # tokens per row of the logit comparisons
    train_steps: int    # steps on the repeated batch (part 1)
    data_seq: int       # data.max_seq_len of the pico-base runs (parts 1 and 4)
    records: int        # data.max_records of those runs
    speed_rows: int     # rows per step in part 2
    seq: int            # tokens per row in parts 2 and 3
    warmup: int         # untimed steps (compilation happens in them)
    timed: int


GPU = Sizes(logit_tokens=256, train_steps=8, data_seq=512, records=32, speed_rows=4, seq=2048, warmup=3, timed=5)
TINY = Sizes(logit_tokens=32, train_steps=3, data_seq=128, records=8, speed_rows=2, seq=64, warmup=1, timed=1)


def emit(**results) -> None:
    """Hand results to the parent, which merges every RESULT line into the final JSON line."""
    print("RESULT " + json.dumps(results), flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cuda_gib(dev: torch.device, what: str = "max_memory_allocated") -> float | None:
    """GiB from torch.cuda.<what>(dev); None on the CPU."""
    return round(getattr(torch.cuda, what)(dev) / 2**30, 3) if dev.type == "cuda" else None


def verdict(part: str, problems: list[str]) -> dict:
    return {f"status_{part}": "failed: " + "; ".join(problems) if problems else "ok"}


def run_config(out_dir: str, dev: torch.device, sizes: Sizes, *overrides: str):
    """train.py's Config: pico-base on the shipped instructions, nothing held out, plus overrides."""
    from training.config import load_config
    return load_config(None, [f"model.path={PICO}", f"data.train={DATA}", f"run.out_dir={out_dir}",
                              f"run.device={dev.type}", f"data.max_seq_len={sizes.data_seq}",
                              f"data.max_records={sizes.records}", "data.eval_fraction=0.0",
                              "train.batch_size=2", "optim.warmup_steps=0", "eval.sample_prompts=0", *overrides])


def packed_rows(vocab: int, rows: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """(rows, seq) rows packed by data/packing.py from random samples whose first quarter (the
    prompt) is masked: several samples per row, as training sees them."""
    g = torch.Generator().manual_seed(seed)
    samples, total = [], 0
    while total < rows * seq:  # enough tokens to fill `rows` rows; pack() fills its first rows best
        n = int(torch.randint(max(4, seq // 16), max(5, seq // 2), (1,), generator=g))
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 4) + ids[n // 4:]})
        total += n
    return collate(pack(samples, seq)[:rows])
