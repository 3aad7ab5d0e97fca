"""See what the model will be trained on, token by token, before spending compute on it.

    python -m data.inspect --config configs/alpaca_en_demo.toml
    python -m data.inspect --data ../shared/data/fastchat_dummy_conversation.json \\
        --model checkpoints/pico-base --template chatml --index 3 --html sample.html

The wrong template or a masking bug does not crash training; it silently teaches the wrong
thing. This tool runs the exact path training uses (load_conversations -> template -> tokenize
+ mask, with the run's config) and shows the result:

- the rendered text of a few samples with the trained spans marked [[like this]]
  (green in a terminal),
- the masking report for the whole file: samples kept, truncated, dropped, and the fraction of
  tokens that are trained on (for instruction data typically 30-80%; ~0% or 100% means the
  template or the strategy is wrong),
- how the tokens split into parts -- answer, tool call, reasoning, tool result, context -- and
  how many of each train,
- an HTML page (runs/inspect/<data file>.html by default) where every token is a box coloured
  by its part (answer green, tool call blue, reasoning violet, tool result orange, context
  grey), faded where its label is -100; hover shows the token id, position and part.
- a warning when special tokens the data uses have embedding rows that look untrained (a base
  checkpoint's chat markers, model/untrained.py), as training start prints it.
"""
from __future__ import annotations

import argparse
import html
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data.chat import chat_for
from data.config import DataConfig, validate_data
from data.conversation import Part
from data.formats import load_conversations
from data.masking import IGNORE_INDEX, sample_segments, tokenize_dataset, tokenize_segments, truncate
from model.checkpoint import folder_untrained_rows
from model.cli import ArgParser, number, run_cli
from model.errors import SFTError
from model.files import atomic_write
from model.options import load_options, opt
from model.untrained import special_ids, untrained_message

GREEN, RESET = "\033[42;30m", "\033[0m"


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds: decode prefixes and take the difference (keeps spaces right)."""
    out, prev = [], ""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        out.append(text[len(prev):] if text.startswith(prev) else tokenizer.decode(ids[k - 1:k]))
        prev = text
    return out


def marked_text(tokenizer, sample: dict, color: bool) -> str:
    """The sample's text with trained spans wrapped in [[...]] (or a green background)."""
    opening, closing = (GREEN, RESET) if color else ("[[", "]]")
    out, inside = [], False
    for piece, label in zip(token_texts(tokenizer, sample["input_ids"]), sample["labels"]):
        trained = label != IGNORE_INDEX
        if trained != inside:
            out.append(opening if trained else closing)
            inside = trained
        out.append(piece)
    return "".join(out) + (closing if inside else "")


PART_STYLE = {Part.ANSWER: "#b6f2b6", Part.TOOL_CALL: "#9fd3ff", Part.REASONING: "#e3c8ff",
              Part.TOOL_RESULT: "#ffe0a8", Part.CONTEXT: "#eee"}


def token_parts(pieces: list[str], masked: list[tuple[str, Part, bool]]) -> list[Part] | None:
    """The Part of each token: the segment holding the token's first character (None when the
    decoded tokens do not spell the rendered text exactly, e.g. after truncation)."""
    if "".join(pieces) != "".join(t for t, _, _ in masked)[:sum(map(len, pieces))]:
        return None
    ends, pos = [], 0
    for text, part, _ in masked:
        pos += len(text)
        ends.append((pos, part))
    parts, at, k = [], 0, 0
    for piece in pieces:
        while k < len(ends) - 1 and at >= ends[k][0]:
            k += 1
        parts.append(ends[k][1])
        at += len(piece)
    return parts


def html_page(tokenizer, samples: list[tuple[int, dict, list | None]], title: str, summary: str) -> str:
    """One block per sample; each token a box coloured by its Part (answer, tool call, reasoning,
    tool result, context), solid when trained and faded when masked (-100)."""
    blocks = []
    for index, s, masked in samples:
        pieces = token_texts(tokenizer, s["input_ids"])
        parts = (token_parts(pieces, masked) if masked else None) or [Part.CONTEXT] * len(pieces)
        spans = []
        for pos, (piece, tid, label, part) in enumerate(zip(pieces, s["input_ids"], s["labels"], parts)):
            trained = label != IGNORE_INDEX
            cls = f"{part.value}{'' if trained else ' m'}"
            shown = html.escape(piece).replace("\n", "\u21b5<br>") or "&#8203;"
            spans.append(f'<span class="{cls}" title="pos {pos} id {tid} {part.value}'
                         f'{"" if trained else " (masked)"}">{shown}</span>')
        n_train = sum(l != IGNORE_INDEX for l in s["labels"])
        blocks.append(f"<h3>conversation {index}: {len(s['input_ids'])} tokens, {n_train} trained</h3>"
                      f"<div class=s>{''.join(spans)}</div>")
    style = "".join(f".{p.value}{{background:{c}}}" for p, c in PART_STYLE.items())
    legend = " ".join(f'<span class="{p.value}">{p.value}</span>' for p in PART_STYLE)
    return ("<!doctype html><meta charset=utf-8><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;margin:2em}.s{font-family:monospace;white-space:pre-wrap;line-height:1.9}"
            ".s span{border:1px solid #ccc;margin:0 1px;padding:1px 0}" + style + ".m{opacity:.45;color:#555}"
            "</style><h1>" + html.escape(title) + "</h1><p>" + html.escape(summary) +
            "</p><p>" + legend + ' <span class="answer m">faded: masked (-100)</span></p>' + "".join(blocks))


def part_shares(tokenizer, template: str, convs: list, strategy: str, train_on_reasoning: bool) -> str:
    """Tokens and trained tokens per Part over a whole file (each segment tokenized on its own,
    so a token that spans two segments is counted in both: a close count, not an exact one)."""
    tokens: dict[Part, int] = {p: 0 for p in Part}
    trained: dict[Part, int] = {p: 0 for p in Part}
    for i, conv in enumerate(convs):
        try:
            samples = sample_segments(template, conv, strategy, train_on_reasoning=train_on_reasoning,
                                      bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        except SFTError:
            continue  # tokenize_dataset above already reported it
        for masked in samples:
            for text, part, is_trained in masked:
                n = len(tokenizer.encode(text))
                tokens[part] += n
                trained[part] += n if is_trained else 0
    total = max(1, sum(trained.values()))
    rows = [f"{p.value} {tokens[p]:,} tokens, {trained[p]:,} trained ({trained[p] / total:.1%} of trained)"
            for p in Part if tokens[p]]
    return "per part: " + "; ".join(rows)


def warn_untrained_rows(folder: str, tok, samples: list[dict]) -> None:
    """The training-start warning about untrained special-token rows, read from the folder's
    embedding alone (memory-mapped: no model is built)."""
    used = special_ids(tok, {i for s in samples for i in s["input_ids"]})
    try:
        rows = folder_untrained_rows(folder, used)
    except SFTError as e:  # e.g. a folder with a tokenizer but no weights
        print(f"note: embedding rows not checked ({e})")
        return
    if rows:
        print(untrained_message(tok, rows, fixed=False))


@dataclass
class ModelPath:
    path: str = opt("checkpoints/pico-base", "model folder whose tokenizer (and chat template) to use")


@dataclass
class InspectConfig:
    """What this tool reads of a training config: model.path and the [data] section."""
    model: ModelPath = field(default_factory=ModelPath)
    data: DataConfig = field(default_factory=DataConfig)


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="python -m data.inspect", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="a training config (TOML); the flags below override it")
    p.add_argument("--data", help="dataset file (data.train)")
    p.add_argument("--format", help="auto, alpaca, sharegpt, openai, oasst (data.format)")
    p.add_argument("--model", help="model folder whose tokenizer to use (model.path)")
    p.add_argument("--template", help="chat template name, or auto (data.template)")
    p.add_argument("--max-len", type=number(int, 8), help="truncate to this many tokens (data.max_seq_len)")
    p.add_argument("--strategy", help="train_on_assistant, train_on_last, train_on_all (data.loss_on)")
    p.add_argument("--index", type=number(int, 0), default=0, help="first sample to show")
    p.add_argument("-n", type=number(int, 1), default=2, help="how many samples to show")
    p.add_argument("--html", help="where to write the HTML page (default: runs/inspect/<data file>.html)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    argv = sys.argv[1:] if argv is None else argv
    return run_cli(lambda: run(p.parse_args(argv)), "--debug" in argv)


def run(args: argparse.Namespace) -> int:
    from model.tokenizer import Tokenizer
    keys = {"data": "data.train", "format": "data.format", "model": "model.path", "template": "data.template",
            "max_len": "data.max_seq_len", "strategy": "data.loss_on"}
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in keys.items() if getattr(args, flag) is not None]
    # a training config holds more than this tool reads: it takes model.path and [data], checked
    cfg = load_options(InspectConfig, args.config, overrides,
                       skip=lambda key: not (key == "model.path" or key.startswith("data.")))
    validate_data(cfg.data)
    tok = Tokenizer.from_pretrained(cfg.model.path)
    chat = chat_for(cfg.model.path, tok, cfg.data.template)  # the same choice as training
    if chat.note:
        print(f"note: {chat.note}")
    template = chat.template
    convs = load_conversations(cfg.data.train, format=cfg.data.format)
    if not convs:
        raise SFTError(f"{cfg.data.train}: no conversations")
    if args.index >= len(convs):
        raise SFTError(f"--index {args.index}: {cfg.data.train} holds {len(convs)} conversations "
                       f"(0 to {len(convs) - 1})")
    samples, report = tokenize_dataset(tok, template, convs, cfg.data.max_seq_len, cfg.data.loss_on, source=cfg.data.train,
                                 train_on_reasoning=cfg.data.train_on_reasoning)
    shown = []
    for i in range(args.index, min(args.index + args.n, len(convs))):
        where = f"{cfg.data.train} conversation {i}"
        print(f"--- conversation {i} (template {template}, {cfg.data.loss_on}) ---")
        kept = 0
        for masked in sample_segments(template, convs[i], cfg.data.loss_on, bos_token=tok.bos_token,
                                      eos_token=tok.eos_token, where=where,
                                      train_on_reasoning=cfg.data.train_on_reasoning):
            ids, flags = tokenize_segments(tok, [(t, f) for t, _, f in masked], where)
            s = truncate({"input_ids": ids, "labels": [x if f else IGNORE_INDEX for x, f in zip(ids, flags)]},
                         cfg.data.max_seq_len)
            if s is not None:  # several samples where the template rewrites earlier turns (Qwen3)
                print(marked_text(tok, s, color=sys.stdout.isatty()))
                shown.append((i, s, masked))
                kept += 1
        if not kept:
            print("(dropped: no trainable token within max_seq_len)")
    warn_untrained_rows(cfg.model.path, tok, samples)
    shares = part_shares(tok, template, convs, cfg.data.loss_on, cfg.data.train_on_reasoning)
    summary = f"{cfg.data.train} with template {template}: {report.summary()}; {shares}"
    print("---\n" + summary)
    path = Path(args.html or Path("runs") / "inspect" / f"{Path(cfg.data.train).stem}.html")
    atomic_write(path, html_page(tok, shown, f"{Path(cfg.data.train).name} / {template}", summary))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
