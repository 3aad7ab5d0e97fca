"""The chat seam: how a model is prompted, where its replies stop, and how replies are made.

Every place that talks to a model in chat form -- sample answers during training, the local
teacher of data synthesis, every generative evaluation, `eval.py chat`, `data.inspect` -- goes
through this one module, so training and inference can never disagree on the format:

    folder + tokenizer --chat_for--> Chat(template, stop ids, stop strings, note)
    messages --Chat.prompt_ids--> render(template, ..., add_generation_prompt=True) -> ids
    conversations --Chat.replies(model)--> batched KV-cache generation -> text cut at a stop

Which template (`resolve_template`): the one asked for by name; else the model's own (its
tokenizer_config.json `chat_template`, matched byte for byte to one we reproduce, or refused by
name: we do not run Jinja); else, for a base model without one, alpaca -- with a note saying so,
because every number measured through the prompt depends on that choice.

Which ids stop a reply (`Chat.stop_ids`): all of them. A model can end a turn in several ways:
the tokenizer's EOS, the template's end-of-turn markers (`<|im_end|>`, `<|eot_id|>`,
`<|eom_id|>` after a tool call) and the ids its config.json lists (Llama-3 lists three). Stopping
on fewer makes a model that ends its turn correctly run on into the next one. Training writes
the same list into generation_config.json, so other tools stop where training taught it to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from data.templates import KNOWN_JINJA, TEMPLATES, render, stop_strings, template_from_tokenizer_config
from model.errors import SFTError

DEFAULT_TEMPLATE = "alpaca"


def resolve_template(folder: str | Path, tokenizer, requested: str = "auto",
                     option: str = "data.template") -> tuple[str, str | None]:
    """(template name, note or None). `option` is how the user names the choice in this tool
    (`data.template=`, `--template`), so messages tell them what to set."""
    if requested and requested != "auto":
        if requested not in TEMPLATES:
            raise SFTError(f"{option} {requested!r}: unknown template; choose one of {', '.join(TEMPLATES)}")
        own = " (overriding the model's own template)" if tokenizer.chat_template else ""
        return requested, (f"template {requested!r} chosen with {option}{own}" if own else None)
    if tokenizer.chat_template:
        try:
            return template_from_tokenizer_config({"chat_template": tokenizer.chat_template}, option), None
        except SFTError as e:  # a template we do not reproduce: the user must name one
            raise SFTError(f"{Path(folder)}/{e}") from None  # e starts "tokenizer_config.json: ..."
    return DEFAULT_TEMPLATE, (f"{folder} has no chat template; prompts use the {DEFAULT_TEMPLATE!r} "
                              f"template (choose another with {option})")


def stop_ids_for(tokenizer, template: str, model_eos_ids: Iterable[int] = ()) -> list[int]:
    """Every id that ends an assistant turn: EOS, the template's single-token end markers, and
    the eos ids of the model's config (see the module docstring)."""
    ids = {tokenizer.eos_id, *model_eos_ids}
    for s in stop_strings(template, tokenizer.eos_token):
        i = tokenizer.token_to_id(s)
        if i is not None and i != getattr(tokenizer, "unk_id", None):
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def cut_at_stop(text: str, stops: list[str]) -> str:
    """The reply up to the first stop string (a marker that is not one token, e.g. in alpaca)."""
    cut = min([text.find(s) for s in stops if s and s in text] or [len(text)])
    return text[:cut].strip()


@dataclass
class Chat:
    """How one model is prompted and stopped; see the module docstring."""
    tokenizer: object
    template: str
    stop_ids: list[int]
    stop_strings: list[str]
    note: str | None = None
    jinja: str | None = field(default=None, repr=False)  # the template as Jinja, for saved models

    def prompt_ids(self, messages: list[dict], **template_options) -> list[int]:
        """Token ids of the conversation so far, ending where the assistant's reply starts.
        The template writes BOS itself where its Jinja does, so none is added here."""
        tok = self.tokenizer
        text = render(self.template, messages, True, bos_token=tok.bos_token, eos_token=tok.eos_token,
                      **template_options)
        return tok.encode(text, bos=False)

    def replies(self, model, conversations: list[list[dict]], max_new_tokens: int = 256,
                batch_size: int = 8, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                seed: int | None = 0, progress: Callable[[int], None] | None = None) -> list[str]:
        """One reply per conversation (each ends where the assistant speaks next), generated in
        batches of similar prompt length (less padding), returned in the caller's order."""
        limit = model.config.max_position_embeddings - max_new_tokens
        if limit <= 0:
            raise SFTError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                           f"{model.config.max_position_embeddings} positions; lower it")
        ids = [self.prompt_ids(c)[-limit:] for c in conversations]  # keep the end: the question
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        texts = [""] * len(ids)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                with torch.no_grad():
                    outs = model.generate([ids[i] for i in idx], max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_k=top_k, top_p=top_p,
                                          stop_ids=self.stop_ids, seed=seed)
                for i, out in zip(idx, outs):
                    texts[i] = cut_at_stop(self.tokenizer.decode(out), self.stop_strings)
                if progress:
                    progress(len(idx))
        finally:
            model.train(was_training)
        return texts


def chat_for(folder: str | Path, tokenizer, requested: str = "auto", model_eos_ids: Iterable[int] = (),
             option: str = "data.template") -> Chat:
    """The Chat of a model folder: its template (resolve_template), stop ids and strings."""
    template, note = resolve_template(folder, tokenizer, requested, option)
    return Chat(tokenizer, template, stop_ids_for(tokenizer, template, model_eos_ids),
                [s for s in stop_strings(template, tokenizer.eos_token) if s], note,
                KNOWN_JINJA.get(template))
