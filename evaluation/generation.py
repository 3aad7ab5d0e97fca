"""Load a model for evaluation and generate chat replies with ITS template, in batches.

Everything generative in the evaluation (IFEval, judged answers, sample generations, chat)
goes through here, so every task sees prompts exactly as the model saw them in training:

    messages -> data.templates.render(template, messages, add_generation_prompt=True) -> text
             -> tokenizer.encode(text) (BOS/EOS strings in the text become special ids) -> ids
             -> model.generate(batch of prompt ids, KV cache) -> new ids -> decode -> cut at stop

Which template: the one named by the checkpoint's tokenizer_config.json (a fine-tuned run saves
it there). A base model such as pico-base has none; then `--template` decides (default alpaca)
and a note says so in the report, because the numbers depend on that choice.

Batching: prompts are sorted by length before they are cut into batches, so each batch pads to
a similar length (less wasted compute on left/right padding inside `generate`), and the replies
are put back in the caller's order afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from data.templates import TEMPLATES, render, stop_strings, template_from_tokenizer_config
from model import Tokenizer, load_pretrained
from model.errors import SFTError

DEFAULT_TEMPLATE = "alpaca"


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    template: str
    folder: str
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)


def pick_template(folder: str | Path, tokenizer: Tokenizer, requested: str | None) -> tuple[str, str | None]:
    """(template name, note or None): the checkpoint's own template unless --template overrides."""
    if requested:
        if requested not in TEMPLATES:
            raise SFTError(f"--template {requested!r}: unknown; choose one of {', '.join(TEMPLATES)}")
        own = " (overriding the checkpoint's own template)" if tokenizer.chat_template else ""
        return requested, f"template {requested!r} chosen with --template{own}"
    if tokenizer.chat_template:
        try:
            return template_from_tokenizer_config(folder), None
        except SFTError as e:  # a template we do not reproduce: the user must name one
            raise SFTError(f"{e} (with eval.py: pass --template NAME)") from None
    return DEFAULT_TEMPLATE, (f"{folder} has no chat template; prompts use the {DEFAULT_TEMPLATE!r} "
                              "template (choose another with --template)")


def load_eval_model(folder: str | Path, adapter: str | Path | None = None, template: str | None = None,
                    dtype: str = "float32", device: str = "cpu") -> EvalModel:
    """Model (+ LoRA adapter) in eval mode, its tokenizer, and the template to prompt it with."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SFTError(f"{folder}: not a model folder (no config.json); pass a Hugging Face-format "
                       "checkpoint such as checkpoints/pico-base")
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
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
    name, note = pick_template(folder, tokenizer, template)
    return EvalModel(model, tokenizer, name, str(folder), str(adapter) if adapter else None,
                     [note] if note else [])


def prompt_ids(em: EvalModel, messages: list[dict]) -> list[int]:
    """Token ids of the rendered conversation, ending where the assistant reply starts."""
    tok = em.tokenizer
    # The template writes BOS itself where its Jinja source does, so encode without adding one.
    text = render(em.template, messages, add_generation_prompt=True, bos_token=tok.bos_token,
                  eos_token=tok.eos_token)
    return tok.encode(text, bos=False)


def template_stops(em: EvalModel) -> list[str]:
    """Strings that end an assistant turn in this template (with this tokenizer's EOS string)."""
    return [s for s in stop_strings(em.template, em.tokenizer.eos_token) if s]


def stop_ids(em: EvalModel) -> list[int]:
    """EOS id(s) from the config plus any template stop string that is a single special token."""
    ids = list(em.model.config.eos_ids)
    for s in template_stops(em):
        tid = em.tokenizer.token_to_id(s)
        if tid is not None and tid != em.tokenizer.unk_id and tid not in ids:
            ids.append(tid)
    return ids


def cut_at_stop(text: str, stops: list[str]) -> str:
    """Truncate at the first stop string (e.g. alpaca's next '### Instruction:')."""
    cut = min([text.find(s) for s in stops if s and s in text] or [len(text)])
    return text[:cut].strip()


def generate_replies(em: EvalModel, conversations: list[list[dict]], max_new_tokens: int = 256,
                     batch_size: int = 8, temperature: float = 0.0, seed: int | None = 0,
                     progress: Callable[[int], None] | None = None) -> list[str]:
    """One reply per conversation (each ends with a user turn), generated in length-sorted batches."""
    ids = [prompt_ids(em, conv) for conv in conversations]
    limit = em.model.config.max_position_embeddings - max_new_tokens
    if limit <= 0:
        raise SFTError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                       f"{em.model.config.max_position_embeddings} positions; lower it")
    ids = [p[-limit:] for p in ids]  # keep the end: the question and the assistant header
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    stops, texts = stop_ids(em), [""] * len(ids)
    stop_txt = template_stops(em)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        with torch.no_grad():
            outs = em.model.generate([ids[i] for i in idx], max_new_tokens=max_new_tokens,
                                     temperature=temperature, stop_ids=stops, seed=seed)
        for i, out in zip(idx, outs):
            texts[i] = cut_at_stop(em.tokenizer.decode(out), stop_txt)
        if progress:
            progress(len(idx))
    return texts
