"""Shared fixtures: where the real models and datasets live, and how tests find them.

Tests that need `../shared/` (real checkpoints and datasets) ask for it through `shared_file`.
On a developer machine without it they skip; in CI (`REQUIRE_SHARED_DATA=1`) they fail, so a
missing data folder can never turn the suite green by skipping everything that matters.
"""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SFT_SHARED_DIR", ROOT.parent / "shared"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _require(path: Path) -> Path:
    if not path.exists():
        msg = f"shared test asset missing: {path}"
        if os.environ.get("REQUIRE_SHARED_DATA") == "1":
            pytest.fail(msg + " (REQUIRE_SHARED_DATA=1)")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_file():
    """`shared_file("data/ifeval_input_data.jsonl")` -> Path, or skip/fail when absent."""
    return lambda rel: _require(SHARED / rel)


PICO = ROOT / "checkpoints" / "pico-base"


@pytest.fixture(scope="session")
def pico_dir() -> Path:
    """The pretrained tiny base model shipped in the repo (checkpoints/pico-base)."""
    return _require(PICO)


@pytest.fixture(scope="session")
def tiny_dir(pico_dir, tmp_path_factory) -> Path:
    """A 2-layer random Llama with pico-base's real tokenizer, saved in HF layout (~0.7 MB):
    fast enough to train a few steps in every test that needs a whole run."""
    from model.checkpoint import save_pretrained
    from model.llama import Config, Transformer
    from model.tokenizer import Tokenizer
    torch.manual_seed(0)
    cfg = Config(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(Transformer(cfg), folder, tokenizer=Tokenizer.from_pretrained(pico_dir))
    return folder


@pytest.fixture(scope="session")
def tiny_llama2_dir() -> Path:
    """Random-weight, sharded, GQA Llama-2 checkpoint with the real Llama-2 tokenizer."""
    return _require(SHARED / "models" / "tiny-random-llama2")


@pytest.fixture(scope="session")
def adapter_dir(tiny_dir, tmp_path_factory) -> Path:
    """A valid r=4 LoRA adapter (q_proj, v_proj) for tiny_dir."""
    from lora import apply_lora, save_adapter
    from model.checkpoint import load_pretrained
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(apply_lora(load_pretrained(tiny_dir), r=4, alpha=8), folder)
    return folder


@pytest.fixture(scope="session")
def cli_runner():
    """Runs the real command-line tools as forked processes of one server that imported torch
    once (tests/cli_forks.py): `cli_runner.run(jobs)` -> {id: {"rc", "seconds", "pid"}}."""
    from cli_forks import ForkRunner
    runner = ForkRunner(parallel=2)
    yield runner
    runner.close()
