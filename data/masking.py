"""Tokenize a conversation and build its labels: learn the answers, not the questions.

Supervised fine-tuning minimises cross-entropy only on the tokens we want the model to *produce*:

    loss = - sum_t  m_t * log p(x_t | x_<t)   /  sum_t m_t        m_t = 1 on trainable tokens

We store the mask in the labels, HF style: `labels` has the same length as `input_ids`,
`labels[t] = input_ids[t]` where token t is trained and -100 (the ignore index of
F.cross_entropy) elsewhere. Labels are *aligned* with the inputs; the loss shifts them
(logits at t predict labels[t+1]), so nothing here is shifted.

Which tokens are trainable comes from the template's segments (data/templates.py):
- train_on_assistant (default): every assistant reply and its end-of-turn token (EOS / <|im_end|>
  / <|eot_id|>) -- if the EOS is not trained, the model never learns to stop.
- train_on_last: only the last assistant reply (earlier ones are context, e.g. for distillation).
- train_on_all: every token (plain language modelling on the rendered text).

The prompt/response boundary pitfall: tokenizing the prompt and the answer separately and
concatenating can give different tokens than tokenizing the whole text (SentencePiece merges
across the boundary: "...:\\n" + "Sure" may tokenize unlike "...:\\nSure"). The model would train on
token sequences it never sees at inference. So we tokenize the *whole* rendered text once, and
find each segment boundary by tokenizing the text up to it: those tokens must be a prefix of the
full tokens. If a boundary falls inside a token the sample is rejected with a message that names
it (TokenBoundaryError), never silently mislabelled.

Truncation keeps the first `max_len` tokens; a sample left with no trainable token (e.g. a long
prompt) is dropped -- `tokenize_conversation` returns None and `tokenize_dataset` counts it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data.templates import render_segments
from model.errors import SFTError
from model.loss import IGNORE_INDEX

STRATEGIES = ("train_on_assistant", "train_on_last", "train_on_all")


class TokenBoundaryError(SFTError):
    """A template segment boundary falls inside a token of the full tokenization."""


def apply_strategy(segments: list[tuple[str, bool]], strategy: str) -> list[tuple[str, bool]]:
    """Re-flag the template's segments for a masking strategy."""
    if strategy == "train_on_assistant":
        return segments
    if strategy == "train_on_all":
        return [(t, True) for t, _ in segments]
    if strategy == "train_on_last":
        last = max((i for i, (_, f) in enumerate(segments) if f), default=-1)
        return [(t, i == last) for i, (t, _) in enumerate(segments)]
    raise SFTError(f"unknown masking strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


def _merge(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbours with the same flag: fewer boundaries to check, same labels."""
    out: list[tuple[str, bool]] = []
    for text, flag in segments:
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + text, flag)
        else:
            out.append((text, flag))
    return out


def tokenize_segments(tokenizer, segments: list[tuple[str, bool]], where: str = "sample") -> tuple[list[int], list[bool]]:
    """Tokens of the joined text, and for each token whether it is trainable.

    Raises TokenBoundaryError when the tokens of a prefix ending at a segment boundary are not a
    prefix of the tokens of the full text.
    """
    segments = _merge(segments)
    full = "".join(t for t, _ in segments)
    ids = tokenizer.encode(full, bos=False, eos=False)
    flags: list[bool] = []
    end_char = 0
    for k, (text, flag) in enumerate(segments):
        end_char += len(text)
        if k == len(segments) - 1:
            end_tok = len(ids)
        else:
            prefix = tokenizer.encode(full[:end_char], bos=False, eos=False)
            end_tok = len(prefix)
            if ids[:end_tok] != prefix or end_tok < len(flags):
                raise TokenBoundaryError(
                    f"{where}: the tokens of the text before {full[end_char:end_char + 20]!r} are not a prefix "
                    f"of the tokens of the whole sample (a token spans the prompt/response boundary); "
                    f"the labels would be wrong, so this sample is rejected")
        flags += [flag] * (end_tok - len(flags))
    return ids, flags


def tokenize_conversation(tokenizer, template_name: str, messages: list[dict], max_len: int | None = None,
                          strategy: str = "train_on_assistant", where: str = "sample") -> dict | None:
    """{"input_ids", "labels"} for one conversation, or None if no trainable token survives.

    `tokenizer` needs `.encode(text, bos=False, eos=False)` (splitting on special-token strings)
    and `.bos_token`/`.eos_token`, which the template writes where its Jinja writes them.
    """
    segments = render_segments(template_name, messages, bos_token=getattr(tokenizer, "bos_token", None),
                               eos_token=getattr(tokenizer, "eos_token", None))
    ids, flags = tokenize_segments(tokenizer, apply_strategy(segments, strategy), where)
    sample = {"input_ids": ids, "labels": [i if f else IGNORE_INDEX for i, f in zip(ids, flags)]}
    return truncate(sample, max_len)


def truncate(sample: dict, max_len: int | None) -> dict | None:
    """The first max_len tokens, or None when no token after the first is trained.

    (The first token is never predicted -- nothing precedes it -- so it cannot be the only target.)
    """
    if max_len is not None and len(sample["input_ids"]) > max_len:
        sample = {"input_ids": sample["input_ids"][:max_len], "labels": sample["labels"][:max_len]}
    return sample if any(l != IGNORE_INDEX for l in sample["labels"][1:]) else None


@dataclass
class MaskingReport:
    """What happened to a dataset on its way to (input_ids, labels)."""
    kept: int = 0
    truncated: int = 0
    dropped_no_trainable: list[int] = field(default_factory=list)
    dropped_boundary: list[int] = field(default_factory=list)
    tokens: int = 0
    trainable_tokens: int = 0

    def summary(self) -> str:
        frac = self.trainable_tokens / max(self.tokens, 1)
        return (f"kept {self.kept} samples ({self.truncated} truncated), {self.tokens} tokens, "
                f"{self.trainable_tokens} trainable ({frac:.1%}); dropped {len(self.dropped_no_trainable)} "
                f"with no trainable token left, {len(self.dropped_boundary)} with a token across a "
                f"prompt/response boundary" + (f" (samples {self.dropped_boundary[:10]})" if self.dropped_boundary else ""))


def tokenize_dataset(tokenizer, template_name: str, conversations: list[list[dict]], max_len: int | None = None,
                     strategy: str = "train_on_assistant", source: str = "data") -> tuple[list[dict], MaskingReport]:
    """Tokenize many conversations; drop and count the ones that cannot be trained on."""
    samples, report = [], MaskingReport()
    for i, messages in enumerate(conversations):
        try:
            s = tokenize_conversation(tokenizer, template_name, messages, None, strategy, f"{source} sample {i}")
        except TokenBoundaryError:
            report.dropped_boundary.append(i)
            continue
        if s is not None and max_len is not None and len(s["input_ids"]) > max_len:
            report.truncated += 1
            s = truncate(s, max_len)
        if s is None:
            report.dropped_no_trainable.append(i)
            continue
        samples.append(s)
        report.kept += 1
        report.tokens += len(s["input_ids"])
        report.trainable_tokens += sum(l != IGNORE_INDEX for l in s["labels"])
    return samples, report
