"""Load a model for evaluation: the model (+ LoRA adapter), and how to prompt it.

Everything generative in the evaluation (IFEval, judged answers, tool calls, samples, chat)
prompts the model through its `Chat` (data/chat.py: template, stop ids, batched replies), so
every task sees prompts exactly as the model saw them in training. A base model such as
pico-base has no chat template; then `--template` decides (default alpaca) and a note says so
in the report, because the numbers depend on that choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.chat import Chat, chat_for
from model import Tokenizer, load_pretrained
from model.checkpoint import check_vocab
from model.errors import SFTError


@dataclass
class EvalModel:
    model: torch.nn.Module
    chat: Chat
    folder: str
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokenizer(self):
        return self.chat.tokenizer

    @property
    def template(self) -> str:
        return self.chat.template


def load_eval_model(folder: str | Path, adapter: str | Path | None = None, template: str | None = None,
                    dtype: str = "float32", device: str = "cpu") -> EvalModel:
    """Model (+ LoRA adapter) in eval mode, and the Chat to prompt it with."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        hint = "; pass a Hugging Face-format checkpoint such as checkpoints/pico-base"
        if (folder / "adapter_config.json").is_file():
            from lora import read_adapter_config  # the adapter records the base it was made on
            base = read_adapter_config(folder).base_model_name_or_path or "BASE"
            hint = f" (it is a LoRA adapter: pass --model {base} --adapter {folder})"
        raise SFTError(f"{folder}: not a model folder (no config.json){hint}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SFTError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    model = load_pretrained(str(folder), dtype=getattr(torch, dtype), device=device)
    if adapter:
        if not Path(adapter).is_dir():
            raise SFTError(f"{adapter}: adapter folder not found (expected adapter_config.json + weights)")
        from lora import load_adapter, merge_lora  # only needed with --adapter
        # Merged W + s·BA gives the same outputs with plain linears: faster generation.
        model = merge_lora(load_adapter(model, str(adapter)))
    model.eval()
    tokenizer = Tokenizer.from_pretrained(str(folder))
    check_vocab(model.config, tokenizer, str(folder / "config.json"))
    chat = chat_for(folder, tokenizer, template or "auto", model.config.eos_ids, option="--template")
    return EvalModel(model, chat, str(folder), str(adapter) if adapter else None,
                     [chat.note] if chat.note else [])
