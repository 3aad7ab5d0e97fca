"""The GPU proof script stays runnable between GPU loans: its CPU dry run is part of CI.

bench/gpu_proof.py is what the first minutes on a GPU run (correctness, speed, memory, FSDP2
under torchrun). Here it runs end to end on the CPU with tiny shapes (`--device cpu --tiny`):
the same code paths, so an API change that would break it on the GPU breaks it here first.
Every part must end "ok" or with a clear "skipped: why", and the final JSON line must carry
the keys its docstring documents, with values that mean what they say.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_proof.py"
PARTS = ("correctness", "speed", "memory", "fsdp")


@pytest.fixture(scope="module")
def dry_run(shared_file) -> dict:
    shared = shared_file("models/tiny-random-llama3").parents[1]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--shared", str(shared)],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def skipped(value) -> bool:
    return isinstance(value, str) and value.startswith("skipped: ") and len(value) > len("skipped: ")


def test_every_part_of_the_dry_run_ends_ok_or_with_a_reason(dry_run):
    assert {dry_run[f"status_{p}"] for p in PARTS} == {"ok"}, {p: dry_run[f"status_{p}"] for p in PARTS}
    assert dry_run["device"] == "cpu" and dry_run["tiny"] is True and dry_run["mode"] == "full"


def test_every_key_of_the_json_line_is_documented_in_the_script(dry_run):
    doc = ast.get_docstring(ast.parse(SCRIPT.read_text()))
    missing = [k for k in dry_run if k not in doc and not k.startswith("status_")]
    assert not missing, f"keys not described in bench/gpu_proof.py's docstring: {missing}"


def test_logits_are_compared_for_every_model_or_its_skip_names_why(dry_run):
    fp32 = dry_run["logit_diff_fp32"]
    assert set(fp32) == {"pico-base", "tiny-random-llama3", "tiny-random-qwen2", "tiny-random-qwen3"}
    assert fp32["pico-base"] == 0.0 and fp32["tiny-random-llama3"] == 0.0  # CPU against CPU: exact
    for name, value in fp32.items():
        assert isinstance(value, float) or skipped(value), (name, value)
        if isinstance(value, float):
            assert 0 < dry_run["logit_diff_bf16"][name] < 1 and dry_run["top1_agree_bf16"][name] > 0.9


def test_full_lora_and_qlora_losses_fall_on_a_repeated_batch(dry_run):
    losses = dry_run["train_loss"]
    assert set(losses) == {"full/bf16-mixed", "full/bfloat16", "lora/bf16-mixed", "qlora/bfloat16"}
    assert all(last < first for first, last in losses.values()), losses


def test_greedy_generation_matches_and_the_speed_and_memory_parts_measured(dry_run):
    assert dry_run["generate_equal"] is True and dry_run["generate_first_mismatch"] is None
    assert set(dry_run["speed_tokens_per_s"]) >= {"eager", "ckpt"}
    assert all(v > 0 for v in dry_run["speed_tokens_per_s"].values())
    assert dry_run["speed_mfu"]["eager"] is None  # no MFU without a known card
    assert set(dry_run["qlora_8b"]) == {"batch1", "batch2"}
    assert 4.1 < dry_run["nf4_bits_per_param"] < 4.2


def test_the_torchrun_child_resumes_to_the_loss_of_an_uninterrupted_run(dry_run):
    assert dry_run["fsdp_backend"] == "gloo" and dry_run["fsdp_world_size"] == 1
    assert isinstance(dry_run["fsdp_sharded"], bool)  # True once shard_model shards a 1-process group
    assert len(dry_run["fsdp_losses_whole"]) == 3
    assert dry_run["fsdp_losses_resumed"] == dry_run["fsdp_losses_whole"]
    assert dry_run["fsdp_resume_diff"] == 0.0


def test_packed_assets_keep_the_first_vocabulary_rows_so_logits_agree(shared_file, tmp_path):
    from model.checkpoint import load_pretrained
    shared = shared_file("models/tiny-random-llama3").parents[1]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shared", str(shared), "--pack-assets", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    small = load_pretrained(tmp_path / "models" / "tiny-random-llama3")
    full = load_pretrained(shared / "models" / "tiny-random-llama3")
    assert small.config.vocab_size == 4096 < full.config.vocab_size
    assert small.config.bos_token_id is None  # 128000 is past the cut: a loader may refuse it
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(small(ids), full(ids)[..., :4096])
    for name in ("tiny-random-qwen2", "tiny-random-qwen3"):  # copied whatever the loader says of them
        assert (tmp_path / "models" / name / "model.safetensors").stat().st_size < 2**20
