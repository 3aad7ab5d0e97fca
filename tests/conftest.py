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


@pytest.fixture
def shared_file():
    """`shared_file("data/ifeval_input_data.jsonl")` -> Path, or skip/fail when absent."""
    return lambda rel: _require(SHARED / rel)


@pytest.fixture
def pico_dir() -> Path:
    """The pretrained tiny base model shipped in the repo (checkpoints/pico-base)."""
    return _require(ROOT / "checkpoints" / "pico-base")


@pytest.fixture
def tiny_llama2_dir() -> Path:
    """Random-weight, sharded, GQA Llama-2 checkpoint with the real Llama-2 tokenizer."""
    return _require(SHARED / "models" / "tiny-random-llama2")
