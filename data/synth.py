"""Synthetic instruction data from a teacher: self-instruct, Evol-Instruct, constrained answers,
and answers with reasoning and tool calls.

    python -m data.synth --config configs/synth_example.toml [key=value ...]

The config is typed like a training config (model/options.py): `output_dir`, a `[teacher]`
table (data/teacher.py) and one table per loop; a loop runs when its input is set
(`self_instruct.seed_path`, `evol.input`, `constrained.input`, `answers.input`). `--help` lists
every option with its default and range.

Every loop appends one JSON line per accepted example to `<output_dir>/<loop>.jsonl` and, on
start, reads back what is already there, so an interrupted run resumes where it stopped (the
teacher cache also makes repeated questions free). A teacher answer that cannot be parsed is
*counted* in `stats["malformed"]`, never fatal: weak teachers produce many.

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
* **Answers** (distillation): the teacher writes the last assistant turn of existing
  conversations again, offered function schemas (`answers.tools`, or each conversation's own).
  Its reasoning and tool calls are kept, and each record is written in the OpenAI messages
  layout that data.formats reads back:
      {"messages": [..., {"role": "assistant", "content": "...", "reasoning_content": "...",
                          "tool_calls": [{"id", "type": "function",
                                          "function": {"name", "arguments": "<JSON string>"}}]}],
       "tools": [...], "source": "answers", "parent_index": i}

The first three write Alpaca records (`instruction`, `input`, `output`); an answer that came with
reasoning keeps it in `output` as a leading `<think>...</think>` block, which every loader splits
back into the reasoning.
"""
from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data.constraints import INSTRUCTION_IDS, LANGUAGE_NAMES, check_instruction, describe_instruction
from data.conversation import Conversation
from data.formats import load_conversations, read_records
from data.formats_tools import parse_tools
from data.teacher import Completion, TeacherConfig, check_teacher, teacher_from_config, to_openai_messages
from model.cli import run_cli
from model.errors import SFTError
from model.files import append_jsonl, read_json, read_jsonl
from model.options import help_text, load_options, opt

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


# ------------------------------------------------------------------------------ prompts

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


@dataclass
class SelfInstructOptions:
    seed_path: str = opt("", "seed tasks (Stanford's alpaca_seed_tasks.jsonl layout); set it to run this loop")
    num_instructions: int = opt(20, "stop when the output holds this many tasks", ge=1)
    num_examples: int = opt(3, "tasks shown to the teacher per request (the last one a new one)", ge=1)
    rouge_threshold: float = opt(0.7, "keep a task only if its ROUGE-L F1 to every known task is below this",
                                 gt=0, le=1)
    batch_size: int = opt(4, "requests per round", ge=1)
    max_rounds: int = opt(50, "give up after this many rounds", ge=1)
    temperature: float = opt(0.7, "sampling temperature", ge=0)
    max_tokens: int = opt(256, "tokens per teacher answer", ge=1)
    seed: int = opt(0, "seed for choosing the example tasks", ge=0)


def read_seed_tasks(path: str | Path) -> list[dict]:
    """Stanford's seed tasks ({"instruction", "instances": [{"input", "output"}, ...]}) as tasks."""
    rows = read_jsonl(path, "seed tasks file")
    for n, t in enumerate(rows, 1):
        if not (isinstance(t.get("instruction"), str) and isinstance(t.get("instances"), list) and t["instances"]
                and isinstance(t["instances"][0], dict)):
            raise SFTError(f"{path}:{n}: a seed task is {{\"instruction\": str, \"instances\": [{{\"input\", \"output\"}}]}}")
    return [{"instruction": t["instruction"], "input": t["instances"][0].get("input", ""),
             "output": t["instances"][0].get("output", "")} for t in rows]


def self_instruct(teacher, seeds: list[dict], out_path: str, opts: SelfInstructOptions | None = None) -> dict:
    """Ask for new tasks until `num_instructions` novel ones are in `out_path` (or rounds run out)."""
    o = opts or SelfInstructOptions()
    made = read_jsonl(out_path, "synthesis output", resumable=True)
    pool = [t["instruction"] for t in seeds + made]
    stats = {"resumed": len(made), "accepted": 0, "malformed": 0, "not_novel": 0, "filtered": 0, "asked": 0}
    rng = random.Random(o.seed + len(made))
    bar = tqdm(total=o.num_instructions, initial=min(len(made), o.num_instructions), desc="self-instruct",
               unit="task", disable=None)
    for _ in range(o.max_rounds):
        if len(made) >= o.num_instructions:
            break
        chats = []
        for _ in range(o.batch_size):
            shots = rng.sample(seeds, min(o.num_examples - 1, len(seeds))) + rng.sample(made or seeds, 1)
            examples = "".join(_format_task(i + 1, t) for i, t in enumerate(shots))
            chats.append(_user(SELF_INSTRUCT_PROMPT.format(examples=examples, n=len(shots) + 1)))
        answers = teacher.complete_many(chats, max_tokens=o.max_tokens, temperature=o.temperature)
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
            if best >= o.rouge_threshold:
                stats["not_novel"] += 1
                continue
            row = dict(task, source="self_instruct", max_rouge_l=round(best, 3))
            append_jsonl(out_path, row)
            made.append(row)
            pool.append(task["instruction"])
            stats["accepted"] += 1
            bar.update(1)
            if len(made) >= o.num_instructions:
                break
        bar.set_postfix(asked=stats["asked"], refused=stats["asked"] - stats["accepted"])
    bar.close()
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


@dataclass
class EvolOptions:
    input: str = opt("", "Alpaca records whose instructions evolve; set it to run this loop")
    limit: int = opt(0, "use the first N records (0: all)", ge=0)
    methods: list[str] = opt([], "draw from these methods (empty: all): " + ", ".join([*EVOL_METHODS, "breadth"]))
    temperature: float = opt(0.7, "sampling temperature", ge=0)
    max_tokens: int = opt(256, "tokens per teacher answer", ge=1)
    seed: int = opt(0, "seed for choosing each record's method", ge=0)


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


def _answer_text(c: Completion) -> str:
    """An Alpaca `output`: the answer, after its thinking as a <think> block when there is one
    (every loader splits that block back into the reasoning, see data/formats.py)."""
    return f"<think>\n{c.reasoning}\n</think>\n\n{c.content}" if c.reasoning else c.content


def evol_instruct(teacher, records: list[dict], out_path: str, opts: EvolOptions | None = None) -> dict:
    """Evolve each record's instruction once, answer it, keep the pair unless eliminated."""
    o = opts or EvolOptions()
    methods = o.methods or list(EVOL_METHODS) + ["breadth"]
    done = {row["parent_index"] for row in read_jsonl(out_path, "synthesis output", resumable=True)}
    stats = {"resumed": len(done), "accepted": 0, "eliminated": 0, "malformed": 0}
    for i, rec in enumerate(tqdm(records, desc="evol-instruct", unit="record", disable=None)):
        if i in done:
            continue
        method = random.Random(o.seed * 100003 + i).choice(methods)
        parent = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
        evolved = teacher.complete(_user(evol_prompt(method, parent)), o.max_tokens, o.temperature).strip()
        if not evolved:
            stats["malformed"] += 1
            continue
        answer = teacher.completions([_user(evolved)], o.max_tokens, o.temperature)[0]
        if answer.tool_calls or answer.problem:  # no tools were offered: a call is not an answer
            stats["malformed"] += 1
            continue
        why = eliminate(parent, evolved, answer.content)
        if why:
            stats["eliminated"] += 1
            stats[why] = stats.get(why, 0) + 1
            continue
        append_jsonl(out_path, {"instruction": evolved, "input": "", "output": _answer_text(answer),
                                "source": "evol_instruct", "evol_method": method, "parent_index": i})
        stats["accepted"] += 1
    return stats


# ------------------------------------------------------------------ constrained answers

@dataclass
class ConstrainedOptions:
    input: str = opt("", "Alpaca records to constrain and answer; set it to run this loop")
    limit: int = opt(0, "use the first N records (0: all)", ge=0)
    constraints_per_prompt: int = opt(1, "verifiable instructions added to each prompt", ge=1)
    attempts: int = opt(4, "answers sampled per prompt before giving up", ge=1)
    temperature: float = opt(0.8, "sampling temperature", ge=0)
    max_tokens: int = opt(256, "tokens per teacher answer", ge=1)
    seed: int = opt(0, "seed for choosing the constraints", ge=0)


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


def constrained_responses(teacher, records: list[dict], out_path: str,
                          opts: ConstrainedOptions | None = None) -> dict:
    """Add verifiable constraints to each instruction; keep the first answer that passes them all."""
    o = opts or ConstrainedOptions()
    done = {row["parent_index"] for row in read_jsonl(out_path, "synthesis output", resumable=True)}
    stats = {"resumed": len(done), "accepted": 0, "no_passing_answer": 0, "answers_rejected": 0}
    bar = tqdm(records, desc="constrained", unit="record", disable=None)
    for i, rec in enumerate(bar):
        if i in done:
            continue
        rng = random.Random(o.seed * 100003 + i)
        base = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
        picked = [sample_constraint(rng, base) for _ in range(o.constraints_per_prompt)]
        prompt = base + " " + " ".join(describe_instruction(iid, kw) for iid, kw in picked)
        for k in range(o.attempts):
            # a trailing newline per retry changes the cache key, so each attempt is a new sample
            answer = teacher.completions([_user(prompt + "\n" * k)], o.max_tokens, o.temperature)[0]
            text_only = not (answer.tool_calls or answer.problem)
            if text_only and all(check_instruction(iid, kw, answer.content, prompt) for iid, kw in picked):
                append_jsonl(out_path, {"instruction": prompt, "input": "", "output": _answer_text(answer),
                                        "instruction_id_list": [p[0] for p in picked],
                                        "kwargs": [p[1] for p in picked], "source": "constrained",
                                        "parent_index": i, "attempts": k + 1})
                stats["accepted"] += 1
                break
            stats["answers_rejected"] += 1
        else:
            stats["no_passing_answer"] += 1
        bar.set_postfix(accepted=stats["accepted"], rejected_answers=stats["answers_rejected"])
    return stats


# ------------------------------------------------------------ answers (distillation, tool calls)

@dataclass
class AnswersOptions:
    input: str = opt("", "conversations (any format data.formats reads) whose last assistant turn the "
                     "teacher writes again; set it to run this loop")
    limit: int = opt(0, "use the first N conversations (0: all)", ge=0)
    tools: str = opt("", "JSON file with a list of function schemas offered with every prompt "
                     "(empty: each conversation's own tools)")
    batch_size: int = opt(8, "prompts per teacher request batch", ge=1)
    temperature: float = opt(0.7, "sampling temperature", ge=0)
    max_tokens: int = opt(512, "tokens per teacher answer", ge=1)


def answer_conversations(teacher, conversations: list[Conversation], out_path: str,
                         opts: AnswersOptions | None = None, tools: list[dict] | None = None) -> dict:
    """The teacher writes the last assistant turn of each conversation again (its answer text,
    reasoning and tool calls), offered `tools` or else the conversation's own; each kept answer is
    one OpenAI-layout record {"messages", "tools", "source", "parent_index"}."""
    o = opts or AnswersOptions()
    done = {row["parent_index"] for row in read_jsonl(out_path, "synthesis output", resumable=True)}
    stats = {"resumed": len(done), "accepted": 0, "malformed": 0, "with_tool_calls": 0, "with_reasoning": 0}
    todo = [i for i in range(len(conversations)) if i not in done]
    bar = tqdm(total=len(todo), desc="answers", unit="answer", disable=None)
    for start in range(0, len(todo), o.batch_size):
        chunk = todo[start:start + o.batch_size]
        prompts = [Conversation(conversations[i][:-1], tools or conversations[i].tools) for i in chunk]
        for i, prompt, answer in zip(chunk, prompts, teacher.completions(prompts, o.max_tokens, o.temperature)):
            if answer.problem or not (answer.content.strip() or answer.tool_calls):
                stats["malformed"] += 1
                continue
            record = {"messages": to_openai_messages(prompt + [answer.message()])}
            if prompt.tools:
                record["tools"] = prompt.tools
            append_jsonl(out_path, {**record, "source": "answers", "parent_index": i})
            stats["accepted"] += 1
            stats["with_tool_calls"] += bool(answer.tool_calls)
            stats["with_reasoning"] += answer.reasoning is not None
        bar.update(len(chunk))
        bar.set_postfix(accepted=stats["accepted"], malformed=stats["malformed"])
    bar.close()
    return stats


# ----------------------------------------------------------------------------------- CLI

@dataclass
class SynthConfig:
    output_dir: str = opt("", "folder for <loop>.jsonl and teacher_cache.jsonl (required)")
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    self_instruct: SelfInstructOptions = field(default_factory=SelfInstructOptions)
    evol: EvolOptions = field(default_factory=EvolOptions)
    constrained: ConstrainedOptions = field(default_factory=ConstrainedOptions)
    answers: AnswersOptions = field(default_factory=AnswersOptions)


LOOP_INPUT = {"self_instruct": "seed_path", "evol": "input", "constrained": "input", "answers": "input"}


def load_synth_config(path: str | None, overrides: list[str] = ()) -> SynthConfig:
    """Defaults < the TOML file < `key=value` overrides, every value checked (model/options.py);
    then what a type cannot say: a teacher, an output folder, and an input for each loop used."""
    cfg = load_options(SynthConfig, path, overrides)
    where = str(path) if path else "command line"
    if not cfg.output_dir:
        raise SFTError(f"{where}: set output_dir = \"<folder>\" (where the synthesised files go)")
    check_teacher(cfg.teacher, where)
    for name, key in LOOP_INPUT.items():
        section = getattr(cfg, name)
        if not getattr(section, key) and section != type(section)():
            raise SFTError(f"{where}: [{name}] sets options but no {key}: set {name}.{key} to run it, "
                           "or remove the table")
    if not any(getattr(getattr(cfg, name), key) for name, key in LOOP_INPUT.items()):
        raise SFTError(f"{where}: nothing to do: set " + " or ".join(f"{n}.{k}" for n, k in LOOP_INPUT.items()))
    known = [*EVOL_METHODS, "breadth"]
    for m in cfg.evol.methods:
        if m not in known:
            raise SFTError(f"{where}: 'evol.methods' has {m!r}; known: {', '.join(known)}")
    return cfg


def _instructions(path: str, limit: int) -> list[dict]:
    """The first `limit` records (0: all) of an Alpaca file, each checked to hold an instruction."""
    records = read_records(path)[:limit or None]
    for where, r in records:
        if not isinstance(r.get("instruction"), str) or not isinstance(r.get("input", ""), (str, type(None))):
            raise SFTError(f"{where}: expected an Alpaca record with a string 'instruction' (and 'input')")
    return [r for _, r in records]


def run(cfg: SynthConfig) -> dict:
    """Run each loop whose input is set (every input is read before the teacher starts)."""
    inputs = {}
    if cfg.self_instruct.seed_path:
        inputs["self_instruct"] = read_seed_tasks(cfg.self_instruct.seed_path)
    for name in ("evol", "constrained"):
        if getattr(cfg, name).input:
            inputs[name] = _instructions(getattr(cfg, name).input, getattr(cfg, name).limit)
    tools = None
    if cfg.answers.input:
        inputs["answers"] = load_conversations(cfg.answers.input)[:cfg.answers.limit or None]
        if cfg.answers.tools:
            tools = parse_tools(read_json(cfg.answers.tools, "tools file"), cfg.answers.tools)
    out = Path(cfg.output_dir)
    teacher = teacher_from_config(cfg.teacher, cache_path=out / "teacher_cache.jsonl")
    loops = {"self_instruct": self_instruct, "evol": evol_instruct, "constrained": constrained_responses,
             "answers": lambda *args: answer_conversations(*args, tools=tools)}
    results = {}
    for name, data in inputs.items():
        results[name] = loops[name](teacher, data, str(out / f"{name}.jsonl"), getattr(cfg, name))
        print(f"{name:<14}" + "  ".join(f"{k}={v}" for k, v in results[name].items()))
    print(f"teacher requests sent: {teacher.calls} (the rest came from the cache)")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data.synth", description="Synthesise instruction data with a teacher.",
        usage="python -m data.synth --config FILE.toml [key=value ...] [--debug]",
        epilog="options (key, default, meaning):\n" + help_text(SynthConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file with output_dir, [teacher] and a table per loop")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    p.add_argument("overrides", nargs="*", help="key=value or section.key=value, applied after the file")
    args = p.parse_args(argv)
    return run_cli(lambda: run(load_synth_config(args.config, args.overrides)), args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
