"""Tokenize a conversation and build its labels: learn the answers, not the questions.

Supervised fine-tuning minimises cross-entropy only on the tokens we want the model to *produce*:

    loss = - sum_t  m_t * log p(x_t | x_<t)   /  sum_t m_t        m_t = 1 on trainable tokens

We store the mask in the labels, HF style: `labels` has the same length as `input_ids`,
`labels[t] = input_ids[t]` where token t is trained and -100 (the ignore index of
F.cross_entropy) elsewhere. Labels are *aligned* with the inputs; the loss shifts them
(logits at t predict labels[t+1]), so nothing here is shifted.

What trains comes from the Part of each template segment (data/templates.py): what the model
writes -- ANSWER and TOOL_CALL, each with its end-of-turn token (EOS / <|im_end|> / <|eot_id|>; if
it is not trained the model never learns to stop), and REASONING unless `train_on_reasoning=False`
(then the thinking is context the answer is conditioned on, not a target). CONTEXT (markup,
system and user turns, the tool list) and TOOL_RESULT (a tool wrote it) never train. Strategies:
- train_on_assistant (default): every assistant turn.
- train_on_last: only the last assistant turn (earlier ones are context, e.g. for distillation).
- train_on_all: every token (plain language modelling on the rendered text; reasoning still
  follows train_on_reasoning).

Templates that rewrite history. Each assistant turn must be trained in the exact text the model
sees when it generates it. For most templates that is simply a prefix of the whole rendered
conversation, so one conversation is one sample. Qwen3's template is not like that: it keeps
`<think>` blocks only on assistant turns after the last user query and strips them before it,
and writes an empty `<think>\\n\\n</think>\\n\\n` only on the final message. So turn 1 of a
two-question chat renders one way while it is being generated (last message: thinking shown)
and another way once the next question follows (thinking gone): a conversation is not a prefix
of itself one turn later, and masking the full rendering would train turn 1 on a text the model
never produces. We therefore check, for every assistant turn k, whether the rendering of the
conversation up to and including turn k is a prefix of the sample; turns that pass train in
that sample, the others get a sample of their own, ending at the latest of them, and so on.
For Qwen3 this gives one sample per user query "episode" (the query, then the assistant turns
and tool results that answer it, earlier episodes as context in the rewritten form), plus a
sample of its own for an intermediate tool-call turn that has no reasoning (it is written
without the empty think block once it is not the last message). For every other template the
check passes and a conversation is one sample, as before. `tokenize_conversation_samples`
returns all samples; `tokenize_conversation` returns the one sample (and refuses a conversation
that splits); `tokenize_dataset` returns all samples and counts conversations and samples.

The prompt/response boundary pitfall: tokenizing the prompt and the answer separately and
concatenating can give different tokens than tokenizing the whole text (SentencePiece merges
across the boundary: "...:\\n" + "Sure" may tokenize unlike "...:\\nSure"). The model would train on
token sequences it never sees at inference. So we tokenize the *whole* rendered text once, and
find each segment boundary by tokenizing the text up to it: those tokens must be a prefix of the
full tokens. If a boundary falls inside a token the sample is rejected with a message that names
it (TokenBoundaryError), never silently mislabelled. Re-tokenizing a growing prefix at every
boundary costs (turns x length); instead each segment but the longest is tokenized once, on its
own (as the continuation of a text), and the segment tokens joined from the start (or from the
end) must equal the full tokens there, which proves that no token spans the boundary. Only where
that fails is the exact prefix tokenized, and the check above decides.

Truncation keeps the first `max_len` tokens; a sample left with no trainable token (e.g. a long
prompt) is dropped -- `tokenize_conversation` returns None and `tokenize_dataset` counts it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal, get_args

from data.conversation import Part, Segments, tools_of
from data.templates import render, render_segments
from model.errors import SFTError
from model.loss import IGNORE_INDEX
from model.tokenizer import Tokenizer

Strategy = Literal["train_on_assistant", "train_on_last", "train_on_all"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
MaskedSegments = list[tuple[str, Part, bool]]  # (text, what it is, whether it trains)


class TokenBoundaryError(SFTError):
    """A template segment boundary falls inside a token of the full tokenization."""


def assistant_turns(segments: Segments) -> list[list[int]]:
    """The indices of each assistant turn's segments: the maximal runs of model-written Parts.

    (Every template writes markup between two assistant turns, so runs and turns correspond.)
    """
    runs: list[list[int]] = []
    for k, (_, part) in enumerate(segments):
        if not part.written_by_model:
            continue
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def _masked(segments: Segments, trained_turns: set[int], train_on_reasoning: bool, where: str,
            n_assistant: int) -> MaskedSegments:
    """Mark the model-written segments of the assistant turns numbered in `trained_turns`."""
    runs = assistant_turns(segments)
    if len(runs) != n_assistant:
        raise SFTError(f"{where}: the template wrote {len(runs)} assistant turns for {n_assistant} assistant "
                       "messages (an empty reply with an empty end-of-turn string?)")
    trained = {k for t in trained_turns for k in runs[t]}
    return [(text, part, k in trained and (train_on_reasoning or part is not Part.REASONING))
            for k, (text, part) in enumerate(segments)]


def sample_segments(template_name: str, messages: list[dict], strategy: Strategy = "train_on_assistant", *,
                    train_on_reasoning: bool = True, bos_token: str | None = None, eos_token: str | None = None,
                    where: str = "conversation") -> list[MaskedSegments]:
    """The training samples of one conversation, each its rendered text cut into (text, Part, trained).

    One sample unless the template rewrites earlier turns (see the module docstring); none when
    the strategy finds no assistant turn to train.
    """
    if strategy not in STRATEGIES:
        raise SFTError(f"unknown masking strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    kw = dict(tools=tools_of(messages), bos_token=bos_token, eos_token=eos_token, where=where)
    if strategy == "train_on_all":
        segs = render_segments(template_name, messages, **kw)
        return [[(t, p, train_on_reasoning or p is not Part.REASONING) for t, p in segs]]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    todo = assistant[-1:] if strategy == "train_on_last" else assistant
    own_text: dict[int, str] = {}  # turn k -> the rendering that ends with turn k, as generated
    samples, end = [], len(messages)
    while todo:
        segs = render_segments(template_name, messages[:end], **kw)
        text = "".join(t for t, _ in segs)
        for k in todo:
            if k not in own_text and k < end - 1:
                own_text[k] = render(template_name, messages[:k + 1], **kw)
        covered = [k for k in todo if k == end - 1 or (k < end and text.startswith(own_text[k]))]
        if covered:
            in_sample = [i for i in assistant if i < end]
            turn_numbers = {in_sample.index(k) for k in covered}
            samples.append(_masked(segs, turn_numbers, train_on_reasoning, where, len(in_sample)))
        todo = [k for k in todo if k not in covered]
        end = max(todo, default=0) + 1
    return samples[::-1]  # in conversation order


def _own_tokens(tokenizer, text: str, first: bool) -> list[int]:
    """The tokens of one segment alone; after the first, as the continuation of a text (no
    SentencePiece dummy prefix: our Tokenizer knows at_start, the test tokenizers have none)."""
    if first or not isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, bos=False, eos=False)
    return tokenizer.encode(text, bos=False, eos=False, at_start=False)


def tokenize_segments(tokenizer, segments: list[tuple[str, bool]], where: str = "sample") -> tuple[list[int], list[bool]]:
    """Tokens of the joined text, and for each token whether it is trainable.

    `segments` are (text, trainable) pairs. Raises TokenBoundaryError when the tokens of a prefix
    ending at a boundary between trained and untrained text are not a prefix of the tokens of
    the full text.

    Each boundary is found without tokenizing the text up to it: the segments before the longest
    one are tokenized alone and joined from the start, those after it from the end; where the
    joined tokens equal the full tokens there, no token spans the boundary. Only where they
    differ is the prefix tokenized whole and checked (the longest segment is never tokenized alone).
    """
    merged: list[tuple[str, bool]] = []  # neighbours with the same flag joined: fewer boundaries, same labels
    for text, flag in segments:
        if merged and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + text, flag)
        else:
            merged.append((text, flag))
    full = "".join(t for t, _ in merged)
    ids = tokenizer.encode(full, bos=False, eos=False)
    cuts = list(itertools.accumulate(len(t) for t, _ in merged))[:-1]  # characters before boundary k

    def exact(k: int) -> int:  # tokens before boundary k: the prefix tokenized whole must be a prefix
        prefix = tokenizer.encode(full[:cuts[k]], bos=False, eos=False)
        if ids[:len(prefix)] != prefix:
            raise boundary_error(k)
        return len(prefix)

    def boundary_error(k: int) -> TokenBoundaryError:
        return TokenBoundaryError(
            f"{where}: the tokens of the text before {full[cuts[k]:cuts[k] + 20]!r} are not a prefix "
            f"of the tokens of the whole sample (a token spans the prompt/response boundary); "
            f"the labels would be wrong, so this sample is rejected")

    widest = max(range(len(merged)), key=lambda k: len(merged[k][0]))
    ends = [0] * len(cuts)  # tokens before boundary k
    at = 0
    for k in range(widest):  # from the start: boundary k ends segment k
        own = _own_tokens(tokenizer, merged[k][0], first=k == 0)
        at = at + len(own) if ids[at:at + len(own)] == own else exact(k)
        ends[k] = at
    at = len(ids)
    for k in range(len(merged) - 1, widest, -1):  # from the end: boundary k - 1 starts segment k
        own = _own_tokens(tokenizer, merged[k][0], first=False)
        at = at - len(own) if len(own) <= at and ids[at - len(own):at] == own else exact(k - 1)
        ends[k - 1] = at
    flags: list[bool] = []
    for k, (_, flag) in enumerate(merged):
        end = ends[k] if k < len(cuts) else len(ids)
        if end < len(flags):
            raise boundary_error(k)
        flags += [flag] * (end - len(flags))
    return ids, flags


def _tokenize_sample(tokenizer, masked: MaskedSegments, where: str) -> dict:
    ids, flags = tokenize_segments(tokenizer, [(t, f) for t, _, f in masked], where)
    return {"input_ids": ids, "labels": [i if f else IGNORE_INDEX for i, f in zip(ids, flags)]}


def _samples_of(tokenizer, template_name, messages, strategy, train_on_reasoning, where) -> list[tuple[str, MaskedSegments]]:
    """(where, masked segments) for each sample, rendered with the tokenizer's BOS/EOS strings."""
    samples = sample_segments(template_name, messages, strategy, train_on_reasoning=train_on_reasoning,
                              bos_token=getattr(tokenizer, "bos_token", None),
                              eos_token=getattr(tokenizer, "eos_token", None), where=where)
    if len(samples) == 1:
        return [(where, samples[0])]
    return [(f"{where} (sample {j + 1} of {len(samples)})", s) for j, s in enumerate(samples)]


def tokenize_conversation_samples(tokenizer, template_name: str, messages: list[dict], max_len: int | None = None,
                                  strategy: Strategy = "train_on_assistant", where: str = "sample", *,
                                  train_on_reasoning: bool = True) -> list[dict]:
    """{"input_ids", "labels"} for every sample of one conversation (several where the template
    rewrites earlier turns), truncated to max_len; samples with no trainable token left are dropped."""
    out = []
    for w, masked in _samples_of(tokenizer, template_name, messages, strategy, train_on_reasoning, where):
        sample = truncate(_tokenize_sample(tokenizer, masked, w), max_len)
        if sample is not None:
            out.append(sample)
    return out


def tokenize_conversation(tokenizer, template_name: str, messages: list[dict], max_len: int | None = None,
                          strategy: Strategy = "train_on_assistant", where: str = "sample", *,
                          train_on_reasoning: bool = True) -> dict | None:
    """{"input_ids", "labels"} for a conversation that is one sample, or None if no trainable token survives.

    `tokenizer` needs `.encode(text, bos=False, eos=False)` (splitting on special-token strings)
    and `.bos_token`/`.eos_token`, which the template writes where its Jinja writes them. A
    conversation the template splits into several samples (Qwen3, several user queries) raises
    SFTError: use tokenize_conversation_samples.
    """
    samples = _samples_of(tokenizer, template_name, messages, strategy, train_on_reasoning, where)
    if len(samples) > 1:
        raise SFTError(f"{where}: template {template_name!r} rewrites earlier turns, so this conversation trains "
                       f"as {len(samples)} samples; use tokenize_conversation_samples")
    return truncate(_tokenize_sample(tokenizer, samples[0][1], where), max_len) if samples else None


def truncate(sample: dict, max_len: int | None) -> dict | None:
    """The first max_len tokens, or None when no token after the first is trained.

    (The first token is never predicted -- nothing precedes it -- so it cannot be the only target.)
    """
    if max_len is not None and len(sample["input_ids"]) > max_len:
        sample = {"input_ids": sample["input_ids"][:max_len], "labels": sample["labels"][:max_len]}
    return sample if any(l != IGNORE_INDEX for l in sample["labels"][1:]) else None


@dataclass
class MaskingReport:
    """What happened to a dataset on its way to (input_ids, labels).

    The dropped_* lists hold conversation numbers (positions in the input), one per dropped sample.
    """
    conversations: int = 0
    samples: int = 0  # rendered samples, before drops (more than conversations where a template splits)
    kept: int = 0
    truncated: int = 0
    dropped_no_trainable: list[int] = field(default_factory=list)
    dropped_boundary: list[int] = field(default_factory=list)
    tokens: int = 0
    trainable_tokens: int = 0

    def summary(self) -> str:
        frac = self.trainable_tokens / max(self.tokens, 1)
        return (f"{self.conversations} conversations -> {self.samples} samples; "
                f"kept {self.kept} samples ({self.truncated} truncated), {self.tokens} tokens, "
                f"{self.trainable_tokens} trainable ({frac:.1%}); dropped {len(self.dropped_no_trainable)} "
                f"with no trainable token left, {len(self.dropped_boundary)} with a token across a "
                f"prompt/response boundary" + (f" (samples {self.dropped_boundary[:10]})" if self.dropped_boundary else ""))


def tokenize_dataset(tokenizer, template_name: str, conversations: list[list[dict]], max_len: int | None = None,
                     strategy: Strategy = "train_on_assistant", source: str = "data", *,
                     train_on_reasoning: bool = True) -> tuple[list[dict], MaskingReport]:
    """Tokenize many conversations into all their samples; drop and count the ones that cannot be trained on."""
    samples, report = [], MaskingReport()
    for i, messages in enumerate(conversations):
        report.conversations += 1
        rendered = _samples_of(tokenizer, template_name, messages, strategy, train_on_reasoning, f"{source} sample {i}")
        if not rendered:
            report.dropped_no_trainable.append(i)
        for where, masked in rendered:
            report.samples += 1
            try:
                s = _tokenize_sample(tokenizer, masked, where)
            except TokenBoundaryError:
                report.dropped_boundary.append(i)
                continue
            if max_len is not None and len(s["input_ids"]) > max_len:
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
