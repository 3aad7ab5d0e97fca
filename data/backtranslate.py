"""Instruction back-translation: the base model writes texts, we derive instructions they satisfy.

A base model cannot follow "answer in lowercase" -- but it can write prose, and a program can
turn prose into a text that *does* follow a verifiable instruction. Reading that backwards gives
an (instruction, response) pair no teacher model was needed for (Li et al. 2023, "Self-Alignment
with Instruction Backtranslation", with the instructions derived by rule instead of by a model):

    1. teacher  pico-base, sampled from an opener about a topic, writes short texts
                ("Once upon a time there was a poor fisherman. He ..."), batched, seeded;
    2. derive   for a text, pick a constraint and either state a property the text already has
                (keywords that occur in it) or make it true by a deterministic edit (lowercase
                it, wrap it in quotes, add a <<title>>, a P.S., an end phrase, *highlights*,
                *** paragraph dividers, cut it under N words, drop its commas, ...);
    3. state    write the instruction: a task about the topic + one wording of the constraint
                (data/demo_wordings.py: training wordings only);
    4. verify   keep the pair only if `data.constraints.check_instruction` passes on the
                response -- the same checker the evaluation scores with -- and count the kept
                and rejected pairs per constraint type.

The held-out evaluation items are built from the other half of data/demo_wordings.py (topics,
tasks, wordings, kwargs never used here) in IFEval's input_data.jsonl layout, so the IFEval code
in evaluation/ifeval.py generates and scores them like any IFEval prompt.

Everything is deterministic for a seed: texts come from `model.generate(seed=...)`, every choice
from one `random.Random(seed)`.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import torch

from data.constraints import check_instruction, describe_instruction
from data.demo_wordings import (HELDOUT_END_PHRASES, HELDOUT_KEYWORDS, HELDOUT_TASKS, HELDOUT_TOPICS,
                                HELDOUT_WORD_LIMITS, OPENERS, POSTSCRIPT_MARKERS, TRAIN_END_PHRASES,
                                TRAIN_TASKS, TRAIN_TOPICS, TRAIN_WORD_LIMITS, WORDINGS)
from data.formats import load_conversations
from data.textutil import count_words, split_sentences
from model.files import atomic_write
from model import load_pretrained
from model.errors import SFTError

CONSTRAINT_IDS = list(WORDINGS)
_STOP = set("""the and that with from this have there their they them then than were what when
which will would could should shall into upon said your very such been some more much only
over once there after before about again where while other these those here little great
made went came""".split())

# ----------------------------------------------------------------------------- 1. teacher texts


def clean_text(text: str, max_words: int = 35) -> str | None:
    """One paragraph of whole sentences (at most ~max_words words), or None if too little is left."""
    text = re.sub(r"\s+", " ", text.replace("*", "").replace("<", "").replace(">", "")).strip()
    sentences, kept, words = split_sentences(text), [], 0
    for s in sentences:
        if not re.search(r"[.!?][\"')]*$", s) or words + count_words(s) > max_words:
            break
        kept.append(s)
        words += count_words(s)
    if len(kept) < 2 or words < 15:
        return None
    return " ".join(kept)


def teacher_texts(model, tok, topics: list[str], per_topic: int, seed: int, max_new_tokens: int = 72,
                  batch_size: int = 64, temperature: float = 0.8, top_k: int = 40) -> list[dict]:
    """[{"topic", "text"}]: pico-base continues an opener about each topic; cleaned, deduplicated."""
    rng = random.Random(seed)
    jobs = [(t, rng.choice(OPENERS).format(topic=t)) for t in topics for _ in range(per_topic)]
    out, seen = [], set()
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        prompts = [tok.encode(opener, bos=True) for _, opener in chunk]
        gens = model.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, stop_ids=[tok.eos_id], seed=seed + start)
        for (topic, _), p, ids in zip(chunk, prompts, gens):
            # decode prompt + continuation together: decoding the continuation alone would drop
            # the space SentencePiece encodes at the start of its first piece
            text = clean_text(tok.decode(p[1:] + ids))
            if text and text not in seen:
                seen.add(text)
                out.append({"topic": topic, "text": text})
    return out

# ----------------------------------------------------------------------------- 2. derive


def _content_words(text: str) -> list[str]:
    """Distinct lowercase words of 4+ letters that are not function words, in text order."""
    words = [w.lower() for w in re.findall(r"[A-Za-z]{4,}", text)]
    return list(dict.fromkeys(w for w in words if w not in _STOP))


def _wrap_words(text: str, words: list[str], left: str, right: str) -> str:
    """Wrap the first whole-word occurrence of each word (case-insensitive)."""
    for w in words:
        text = re.sub(rf"\b({re.escape(w)})\b", lambda m: left + m.group(1) + right, text, count=1,
                      flags=re.IGNORECASE)
    return text


def title_of(topic: str) -> str:
    """"a poor fisherman" -> "The Poor Fisherman"."""
    return "The " + " ".join(w.capitalize() for w in topic.split()[1:])


def draw_kwargs(iid: str, text: str, rng: random.Random, half: str) -> dict | None:
    """The instruction's IFEval kwargs; open-ended values come from the `half` ("train"/"heldout") pool.

    Training keywords are back-translated: words that occur in `text` (never a held-out keyword).
    Returns None when the text cannot carry the constraint (e.g. no content word to pick).
    """
    train = half == "train"
    if iid == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)}
    if iid == "startend:end_checker":
        if train and rng.random() < 0.5:  # back-translated: the text's own last words
            return {"end_phrase": " ".join(text.split()[-rng.randint(3, 5):])}
        return {"end_phrase": rng.choice(TRAIN_END_PHRASES if train else HELDOUT_END_PHRASES)}
    if iid == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.randint(1, 3)}
    if iid == "detectable_content:number_placeholders":
        return {"num_placeholders": rng.randint(1, 3)}
    if iid == "length_constraints:number_paragraphs":
        return {"num_paragraphs": rng.randint(2, 4)}
    if iid == "length_constraints:number_words":
        return {"num_words": rng.choice(TRAIN_WORD_LIMITS if train else HELDOUT_WORD_LIMITS),
                "relation": "less than"}
    if iid == "keywords:existence":
        pool = [w for w in _content_words(text) if w not in HELDOUT_KEYWORDS] if train else HELDOUT_KEYWORDS
        return {"keywords": rng.sample(pool, min(len(pool), rng.randint(1, 2)))} if pool else None
    return {}


def apply_edit(iid: str, kw: dict, text: str, other: str, topic: str, rng: random.Random) -> str | None:
    """Edit `text` (a second text `other` for two answers / the P.S.) so that it follows (iid, kw).

    None when the rule cannot apply (too few sentences or words); the checker judges the rest.
    """
    sents = split_sentences(text)
    if iid == "change_case:english_lowercase":
        return text.lower()
    if iid == "change_case:english_capital":
        return text.upper()
    if iid == "punctuation:no_comma":
        return re.sub(r"\s*,", "", text)
    if iid == "startend:quotation":
        return f'"{text}"'
    if iid == "detectable_format:title":
        return f"<<{title_of(topic)}>>\n\n{text}"
    if iid == "detectable_content:postscript":
        return f"{text}\n\n{kw['postscript_marker']} {split_sentences(other)[0]}"
    if iid == "startend:end_checker":
        return text if text.endswith(kw["end_phrase"]) else f"{text} {kw['end_phrase']}"
    if iid in ("detectable_format:number_highlighted_sections", "detectable_content:number_placeholders"):
        n = kw.get("num_highlights", kw.get("num_placeholders"))
        words = _content_words(text)
        marks = ("*", "*") if "highlighted" in iid else ("[", "]")
        return _wrap_words(text, rng.sample(words, n), *marks) if len(words) >= n else None
    if iid == "length_constraints:number_paragraphs":
        n = kw["num_paragraphs"]
        if len(sents) < n:
            return None
        cuts = sorted(rng.sample(range(1, len(sents)), n - 1))
        return "\n\n***\n\n".join(" ".join(sents[a:b]) for a, b in zip([0] + cuts, cuts + [len(sents)]))
    if iid == "length_constraints:number_words":
        kept = []
        for s in sents:  # whole sentences while the count stays under the limit
            if count_words(" ".join(kept + [s])) >= kw["num_words"]:
                break
            kept.append(s)
        return " ".join(kept) or None
    if iid == "keywords:existence":
        return text  # the keywords were read off this text: it already satisfies them
    if iid == "detectable_format:constrained_response":
        return f"My answer is {rng.choice(['yes', 'no', 'maybe'])}. {text}"
    if iid == "combination:two_responses":
        return f"{text}\n\n******\n\n{other}" if other.strip() != text.strip() else None
    raise SFTError(f"backtranslate: no rule derives instruction {iid!r}; known: {', '.join(CONSTRAINT_IDS)}")


# ----------------------------------------------------------------------------- 3. state


def state(iid: str, kwargs: dict, wording: str | None) -> str:
    """The constraint as a sentence: a wording from demo_wordings (None: IFEval's own sentence)."""
    if wording is None:
        return describe_instruction(iid, kwargs)
    values = dict(kwargs)
    if "keywords" in values:
        values["keywords_text"] = " and ".join(f"'{k}'" for k in values["keywords"])
    return wording.format(**values)


def _prompt(task: str, topic: str, constraint: str) -> str:
    return f"{task.format(topic=topic)} {constraint}"

# ----------------------------------------------------------------------------- 4. verify + build


def build_pairs(texts: list[dict], seed: int, per_text: int = 4,
                ids: list[str] | None = None) -> tuple[list[dict], dict[str, Counter]]:
    """Training pairs {"messages": [user, assistant], "instruction_id", "kwargs"} + counts per id.

    Each text gets `per_text` different constraints; a pair is kept only if its response passes
    `check_instruction`. Counts: {iid: Counter(kept=, rejected=)} (a rule that could not apply
    to a text, e.g. too few sentences for 4 paragraphs, counts as rejected).
    """
    rng, ids = random.Random(seed), ids or CONSTRAINT_IDS
    by_topic: dict[str, list[str]] = {}
    for t in texts:
        by_topic.setdefault(t["topic"], []).append(t["text"])
    pairs, counts = [], {iid: Counter(kept=0, rejected=0) for iid in ids}
    for t in texts:
        others = [o for o in by_topic[t["topic"]] if o != t["text"]] or [t["text"]]
        for iid in rng.sample(ids, min(per_text, len(ids))):
            kwargs = draw_kwargs(iid, t["text"], rng, "train")
            response = None if kwargs is None else apply_edit(iid, kwargs, t["text"], rng.choice(others),
                                                              t["topic"], rng)
            if response is None or not check_instruction(iid, kwargs, response):
                counts[iid]["rejected"] += 1
                continue
            prompt = _prompt(rng.choice(TRAIN_TASKS), t["topic"],
                             state(iid, kwargs, rng.choice(WORDINGS[iid]["train"])))
            pairs.append({"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": response}],
                          "instruction_id": iid, "kwargs": kwargs})
            counts[iid]["kept"] += 1
    return pairs, counts


def heldout_items(per_id: int, seed: int, ids: list[str] | None = None) -> list[dict]:
    """Held-out evaluation items in IFEval's layout: {key, prompt, instruction_id_list, kwargs}.

    Topics, tasks, wordings and open-ended kwargs come from the HELDOUT half of demo_wordings.
    The kwargs are drawn by the same rules as training (`draw_kwargs`) from the held-out pools.
    """
    rng, ids = random.Random(seed + 1), ids or CONSTRAINT_IDS
    items = []
    for iid in ids:
        for k in range(per_id):
            topic = HELDOUT_TOPICS[(k + rng.randrange(len(HELDOUT_TOPICS))) % len(HELDOUT_TOPICS)]
            kwargs = draw_kwargs(iid, "", rng, "heldout")
            wording = WORDINGS[iid]["heldout"][k % len(WORDINGS[iid]["heldout"])]
            prompt = _prompt(HELDOUT_TASKS[k % len(HELDOUT_TASKS)], topic, state(iid, kwargs, wording))
            items.append({"key": len(items), "prompt": prompt, "instruction_id_list": [iid],
                          "kwargs": [kwargs]})
    return items


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    """JSONL, written atomically (temp file in the same folder, then rename)."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(path)


def counts_table(counts: dict[str, Counter]) -> str:
    """Kept/rejected pairs per constraint type, as aligned text."""
    w = max(len(k) for k in counts)
    lines = [f"{'constraint':<{w}}  kept  rejected"]
    lines += [f"{iid:<{w}}  {c['kept']:>4}  {c['rejected']:>8}" for iid, c in counts.items()]
    return "\n".join(lines)


def build_demo_data(model_path: str, tok, out_dir: str | os.PathLike, mix: str = "", mix_records: int = 0,
                    per_topic: int = 8, per_text: int = 4, heldout_per_type: int = 6, seed: int = 0,
                    ids: list[str] | None = None, log=print) -> tuple[Path, Path]:
    """Teacher texts -> verified pairs (+ the first `mix_records` real conversations of `mix`, 0: all)
    -> out_dir/demo_train.jsonl, and the held-out items -> out_dir/demo_heldout.jsonl."""
    model = load_pretrained(model_path).eval()
    with torch.no_grad():
        texts = teacher_texts(model, tok, TRAIN_TOPICS, per_topic, seed)
    pairs, counts = build_pairs(texts, seed, per_text, ids)
    log(f"back-translation: {len(texts)} teacher texts from {model_path}, "
        f"{len(pairs)} verified pairs\n{counts_table(counts)}")
    # one layout for both sources (openai "messages"), whatever format the real file is in
    real = [{"messages": conv} for conv in load_conversations(mix)] if mix else []
    real = real[:mix_records] if mix_records else real
    records = pairs + real
    random.Random(seed).shuffle(records)
    train = write_jsonl(Path(out_dir) / "demo_train.jsonl", records)
    held = write_jsonl(Path(out_dir) / "demo_heldout.jsonl", heldout_items(heldout_per_type, seed, ids))
    log(f"wrote {train} ({len(pairs)} constraint pairs + {len(real)} records of {mix or 'nothing'}) "
        f"and {held} (held-out topics, tasks, wordings and values)")
    return train, held
