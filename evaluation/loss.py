"""Held-out masked loss and perplexity: the same number training optimises, on unseen data.

Each held-out conversation is rendered with the chat template and tokenized with the same
masking as training (`data.masking.tokenize_dataset`: labels are -100 everywhere but the
assistant turns), packed into rows (`data.packing.pack`: block-diagonal attention through
seq_ids, RoPE positions restarting per sample, so packing changes nothing but speed), and
scored with the one masked cross-entropy of the project (`model.loss.masked_ce_sum`).

The mean is taken over ALL trainable tokens of the whole set, sum(loss) / sum(n), not as a mean
of per-batch means: batches hold different numbers of assistant tokens, and a per-batch mean
would weight a token in a short batch more than one in a long batch.

    loss = sum_i CE_i / N        perplexity = exp(loss)      (per token of THIS tokenizer)

Perplexities from different tokenizers are not comparable: fewer, longer tokens mean a larger
per-token loss for the same text.
"""
from __future__ import annotations

import math

from data.masking import tokenize_dataset
from data.packing import collate, pack
from model.errors import SFTError
from model.loss import loss_over_rows


def heldout_loss(model, tokenizer, template: str, conversations: list[list[dict]], max_len: int | None = None,
                 batch_size: int = 8, source: str = "held-out data") -> dict:
    """Masked loss/perplexity of `conversations` under `template`; counts what was skipped."""
    max_len = max_len or model.config.max_position_embeddings
    samples, report = tokenize_dataset(tokenizer, template, conversations, max_len=max_len, source=source)
    if not samples:
        raise SFTError(f"{source}: no conversation left to score with template {template!r} and "
                       f"max_len {max_len}: {report.summary()}")
    rows = collate(pack(samples, max_len))
    n_rows = len(rows["input_ids"])
    batches = [list(range(s, min(s + batch_size, n_rows))) for s in range(0, n_rows, batch_size)]
    total, n_tokens = loss_over_rows(model, rows, batches)  # the function training uses too
    loss = total / max(1, n_tokens)
    return {"metrics": {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "n_tokens": n_tokens,
                        "n_conversations": len(samples)},
            "config": {"template": template, "max_len": max_len, "source": source,
                       "masking": report.summary()}}
