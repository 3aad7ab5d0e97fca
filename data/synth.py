"""Synthetic instruction data from a teacher: self-instruct, Evol-Instruct, constrained answers.

All three loops append one JSON line per accepted example to an output file and, on start, read
back what is already there, so an interrupted run resumes where it stopped (the teacher cache
also makes repeated questions free). A teacher answer that cannot be parsed is *counted* in
`stats["malformed"]`, never fatal: weak teachers produce many.

* **Self-instruct** (Wang et al. 2022; Alpaca): show the teacher a few tasks from the pool
  (seed tasks at first), ask for a new one as `Instruction: / Input: / Output:`, and keep it
  only if it is *novel*: its ROUGE-L F1 against every instruction in the pool stays below the
  threshold (0.7 in the paper). ROUGE-L is the longest common subsequence of words:
  P = LCS/len(candidate), R = LCS/len(reference), F1 = 2PR/(P+R). Accepted tasks join the pool.
* **Evol-Instruct** (WizardLM, Xu et al. 2023): rewrite an instruction to be harder (in-depth:
  add a constraint, deepen, concretise, increase reasoning steps, complicate the input) or
  new on the same topic (in-breadth), answer it, then apply the paper's elimination rules: the
  evolved instruction brings no new information (here: ROUGE-L to the parent >= 0.9), the
  answer is an apology or too short, the answer is only punctuation and stop words, or the
  instruction copies the rewriting prompt's own words ("#Rewritten Prompt#", "given prompt").
* **Constrained responses**: add IFEval-style verifiable instructions (data/constraints.py) to
  an instruction, sample up to `attempts` teacher answers and keep the first one that passes
  every checker (rejection sampling). The record keeps `instruction_id_list` and `kwargs`.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from data.constraints import INSTRUCTION_IDS, LANGUAGE_NAMES, check_instruction, describe_instruction
from model.files import append_jsonl, read_jsonl

# ----------------------------------------------------------------------------- ROUGE-L

def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lowercased word tokens."""
    a, b = re.findall(r"\w+", candidate.lower()), re.findall(r"\w+", reference.lower())
    if not a or not b:
        return 0.0
    lcs = _lcs(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


# ---------------------------------------------------------------------------- JSONL I/O

def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------- self-instruct

SELF_INSTRUCT_PROMPT = (
    "You are asked to come up with a new, diverse task instruction for a language model, "
    "with an optional input and the correct output. Do not repeat the examples.\n\n{examples}\n"
    "Task {n}:\nInstruction:"
)
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
             "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")


def _format_task(i: int, t: dict) -> str:
    return f"Task {i}:\nInstruction: {t['instruction']}\nInput: {t.get('input') or '<noinput>'}\nOutput: {t['output']}\n"


def parse_task(text: str) -> dict | None:
    """Parse the teacher's continuation "<instruction>\\nInput: ...\\nOutput: ..." (None if malformed)."""
    text = "Instruction:" + text if not text.lstrip().lower().startswith("instruction:") else text
    m = re.search(r"Instruction:\s*(.+?)\s*\n\s*Input:\s*(.*?)\s*\n\s*Output:\s*(.+?)(?:\n\s*Task \d+:|$)",
                  text, flags=re.S | re.I)
    if not m:
        return None
    inp = m.group(2).strip()
    return {"instruction": m.group(1).strip(), "input": "" if inp.lower() in ("<noinput>", "none", "") else inp,
            "output": m.group(3).strip()}


def _reject_instruction(inst: str) -> str | None:
    words = inst.split()
    if not 3 <= len(words) <= 150:
        return "length"
    if any(re.search(rf"\b{b}\b", inst.lower()) for b in BLACKLIST):
        return "blacklisted word"
    if not inst[0].isalnum() or not inst.isascii():
        return "bad characters"
    return None


def self_instruct(teacher, seed_path: str, out_path: str, num_instructions: int = 20,
                  num_examples: int = 3, rouge_threshold: float = 0.7, batch_size: int = 4,
                  max_rounds: int = 50, temperature: float = 0.7, max_tokens: int = 256,
                  seed: int = 0) -> dict:
    seeds = [{"instruction": t["instruction"], "input": t["instances"][0]["input"],
              "output": t["instances"][0]["output"]} for t in read_jsonl(seed_path, "seed tasks file")]
    made = read_jsonl(out_path, "synthesis output", resumable=True)
    pool = [t["instruction"] for t in seeds + made]
    stats = {"resumed": len(made), "accepted": 0, "malformed": 0, "not_novel": 0, "filtered": 0, "asked": 0}
    rng = random.Random(seed + len(made))
    for _ in range(max_rounds):
        if len(made) >= num_instructions:
            break
        chats = []
        for _ in range(batch_size):
            shots = rng.sample(seeds, min(num_examples - 1, len(seeds))) + rng.sample(made or seeds, 1)
            examples = "".join(_format_task(i + 1, t) for i, t in enumerate(shots))
            chats.append(_user(SELF_INSTRUCT_PROMPT.format(examples=examples, n=len(shots) + 1)))
        answers = teacher.complete_many(chats, max_tokens=max_tokens, temperature=temperature)
        stats["asked"] += len(chats)
        for text in answers:
            task = parse_task(text)
            if task is None:
                stats["malformed"] += 1
                continue
            if _reject_instruction(task["instruction"]):
                stats["filtered"] += 1
                continue
            best = max((rouge_l(task["instruction"], p) for p in pool), default=0.0)
            if best >= rouge_threshold:
                stats["not_novel"] += 1
                continue
            row = dict(task, source="self_instruct", max_rouge_l=round(best, 3))
            append_jsonl(out_path, row)
            made.append(row)
            pool.append(task["instruction"])
            stats["accepted"] += 1
            if len(made) >= num_instructions:
                break
    return stats


# ------------------------------------------------------------------------- Evol-Instruct

_EVOL_HEAD = ("I want you to act as a Prompt Rewriter. Rewrite the given prompt into a more complex "
              "version that famous AI systems would find harder, but that humans can still "
              "understand and answer. Do not omit the input of the given prompt. {how} The rewritten "
              "prompt may add only 10 to 20 words. Reply with the rewritten prompt only.\n\n"
              "#Given Prompt#:\n{prompt}\n\n#Rewritten Prompt#:\n")
EVOL_METHODS = {
    "add_constraints": "Add one more constraint or requirement to the prompt.",
    "deepen": "If the prompt asks about a certain issue, increase the depth and breadth of the inquiry.",
    "concretize": "Replace general concepts with more specific concepts.",
    "increase_reasoning": "If the prompt can be solved with a few simple steps, rewrite it to explicitly request multi-step reasoning.",
    "complicate_input": "Add complex input data to the prompt, such as a table, code or a longer passage to work on.",
}
BREADTH_PROMPT = ("I want you to act as a Prompt Creator. Draw inspiration from the given prompt to create "
                  "a brand new prompt in the same domain but rarer. It should be of similar length and "
                  "difficulty and answerable by humans. Reply with the created prompt only.\n\n"
                  "#Given Prompt#:\n{prompt}\n\n#Created Prompt#:\n")
_STOPWORDS = set("a an the of to and or in on is are be it that this i you he she we they".split())


def evol_prompt(method: str, instruction: str) -> str:
    if method == "breadth":
        return BREADTH_PROMPT.format(prompt=instruction)
    return _EVOL_HEAD.format(how=EVOL_METHODS[method], prompt=instruction)


def eliminate(parent: str, evolved: str, response: str) -> str | None:
    """The paper's elimination rules; returns the failed rule or None if the pair is kept."""
    low = evolved.lower()
    if not evolved.strip() or any(k in low for k in ("given prompt", "rewritten prompt", "#created prompt#", "created prompt")):
        return "copied the rewriting prompt"
    if rouge_l(evolved, parent) >= 0.9:
        return "no information gain over the parent"
    words = re.findall(r"\w+", response.lower())
    if "sorry" in response.lower() and len(words) < 80:
        return "teacher could not answer (apology)"
    if not words or all(w in _STOPWORDS for w in words):
        return "response only punctuation and stop words"
    return None


def evol_instruct(teacher, records: list[dict], out_path: str, methods: list[str] | None = None,
                  temperature: float = 0.7, max_tokens: int = 256, seed: int = 0) -> dict:
    methods = methods or list(EVOL_METHODS) + ["breadth"]
    done = {row["parent_index"] for row in read_jsonl(out_path, "synthesis output", resumable=True)}
    stats = {"resumed": len(done), "accepted": 0, "eliminated": 0, "malformed": 0}
    for i, rec in enumerate(records):
        if i in done:
            continue
        method = random.Random(seed * 100003 + i).choice(methods)
        parent = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
        evolved = teacher.complete(_user(evol_prompt(method, parent)), max_tokens, temperature).strip()
        if not evolved:
            stats["malformed"] += 1
            continue
        response = teacher.complete(_user(evolved), max_tokens, temperature)
        why = eliminate(parent, evolved, response)
        if why:
            stats["eliminated"] += 1
            stats[why] = stats.get(why, 0) + 1
            continue
        append_jsonl(out_path, {"instruction": evolved, "input": "", "output": response,
                                "source": "evol_instruct", "evol_method": method, "parent_index": i})
        stats["accepted"] += 1
    return stats


# ------------------------------------------------------------------ constrained answers

def sample_constraint(rng: random.Random, instruction: str) -> tuple[str, dict]:
    """A random IFEval instruction id with plausible kwargs."""
    iid = rng.choice(INSTRUCTION_IDS)
    rel = rng.choice(["less than", "at least"])
    words = [w for w in re.findall(r"[a-z]{4,}", instruction.lower())] or ["answer"]
    kw = {
        "keywords:existence": {"keywords": rng.sample(words, min(2, len(words)))},
        "keywords:frequency": {"keyword": rng.choice(words), "frequency": rng.randint(1, 3), "relation": rel},
        "keywords:forbidden_words": {"forbidden_words": ["very", "really"]},
        "keywords:letter_frequency": {"letter": rng.choice("aeiost"), "let_frequency": rng.randint(3, 10), "let_relation": rel},
        "language:response_language": {"language": rng.choice(sorted(LANGUAGE_NAMES))},
        "length_constraints:number_sentences": {"num_sentences": rng.randint(2, 6), "relation": rel},
        "length_constraints:number_paragraphs": {"num_paragraphs": rng.randint(2, 4)},
        "length_constraints:number_words": {"num_words": rng.choice([30, 50, 100]), "relation": rel},
        "length_constraints:nth_paragraph_first_word": {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "finally"},
        "detectable_content:number_placeholders": {"num_placeholders": rng.randint(1, 3)},
        "detectable_content:postscript": {"postscript_marker": rng.choice(["P.S.", "P.P.S"])},
        "detectable_format:number_bullet_lists": {"num_bullets": rng.randint(2, 5)},
        "detectable_format:number_highlighted_sections": {"num_highlights": rng.randint(1, 3)},
        "detectable_format:multiple_sections": {"section_spliter": "Section", "num_sections": rng.randint(2, 4)},
        "combination:repeat_prompt": {"prompt_to_repeat": instruction},
        "startend:end_checker": {"end_phrase": "Is there anything else I can help with?"},
        "change_case:capital_word_frequency": {"capital_frequency": rng.randint(2, 10), "capital_relation": rel},
    }.get(iid, {})
    return iid, kw


def constrained_responses(teacher, records: list[dict], out_path: str, constraints_per_prompt: int = 1,
                          attempts: int = 4, temperature: float = 0.8, max_tokens: int = 256,
                          seed: int = 0) -> dict:
    done = {row["parent_index"] for row in read_jsonl(out_path, "synthesis output", resumable=True)}
    stats = {"resumed": len(done), "accepted": 0, "no_passing_answer": 0, "answers_rejected": 0}
    for i, rec in enumerate(records):
        if i in done:
            continue
        rng = random.Random(seed * 100003 + i)
        base = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
        picked = [sample_constraint(rng, base) for _ in range(constraints_per_prompt)]
        prompt = base + " " + " ".join(describe_instruction(iid, kw) for iid, kw in picked)
        for k in range(attempts):
            # a trailing newline per retry changes the cache key, so each attempt is a new sample
            answer = teacher.complete(_user(prompt + "\n" * k), max_tokens, temperature)
            if all(check_instruction(iid, kw, answer, prompt) for iid, kw in picked):
                append_jsonl(out_path, {"instruction": prompt, "input": "", "output": answer,
                                        "instruction_id_list": [p[0] for p in picked],
                                        "kwargs": [p[1] for p in picked], "source": "constrained",
                                        "parent_index": i, "attempts": k + 1})
                stats["accepted"] += 1
                break
            stats["answers_rejected"] += 1
        else:
            stats["no_passing_answer"] += 1
    return stats


# ----------------------------------------------------------------------------------- CLI

def run(config_path: str) -> dict:
    """`python -m data.synth --config FILE.toml`: run each of [self_instruct], [evol], [constrained]."""
    import tomllib

    from data.filters import read_records
    from data.teacher import teacher_from_config
    from model.errors import SFTError
    from model.files import read_text
    try:
        cfg = tomllib.loads(read_text(config_path, "synthesis config (TOML)"))
    except tomllib.TOMLDecodeError as e:
        raise SFTError(f"{config_path}: invalid TOML ({e})") from None
    if "teacher" not in cfg or "output_dir" not in cfg:
        raise SFTError(f"{config_path}: needs output_dir and a [teacher] table")
    out = Path(cfg["output_dir"])
    teacher = teacher_from_config(cfg["teacher"], cache_path=str(out / "teacher_cache.jsonl"))
    results = {}
    loops = {"self_instruct": self_instruct, "evol": evol_instruct, "constrained": constrained_responses}
    for name, fn in loops.items():
        if name not in cfg:
            continue
        opts = dict(cfg[name])
        if name != "self_instruct":
            if "input" not in opts:
                raise SFTError(f"{config_path} [{name}]: needs input = <Alpaca-format file>")
            records = read_records(opts.pop("input"))[: opts.pop("limit", None)]
            opts["records"] = records
        try:
            results[name] = fn(teacher, out_path=str(out / f"{name}.jsonl"), **opts)
        except TypeError as e:
            raise SFTError(f"{config_path} [{name}]: {e}") from None
        print(f"{name:<14}" + "  ".join(f"{k}={v}" for k, v in results[name].items()))
    print(f"teacher requests sent: {teacher.calls} (the rest came from the cache)")
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    from model.cli import run_cli
    ap = argparse.ArgumentParser(description="synthesise instruction data with a teacher")
    ap.add_argument("--config", required=True)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = ap.parse_args(argv)
    return run_cli(lambda: run(args.config), args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
