"""IFEval: does the model follow instructions whose success a program can check?

Each of the 541 prompts carries one to three verifiable instructions ("answer in fewer than
50 words", "no commas", "wrap the answer in JSON", ...). The model answers each prompt once
(greedy, its own chat template, batched generation with the KV cache), and every instruction
is checked by `data.constraints` (the same checkers the data side uses to filter synthetic
data, so "what we train for" and "what we measure" cannot drift apart).

Four numbers, as in the IFEval paper:

    instruction-level = followed instructions / all instructions
    prompt-level      = prompts whose instructions are ALL followed / prompts
    strict: the raw response must pass;  loose: any of 8 variants passes (first line removed or
            not, last line removed or not, '*' stripped or not), forgiving "Sure, here it is:"
            preambles and markdown emphasis.

plus a per-instruction-type table (which constraints the model never follows tells you what the
SFT data lacks). Responses can also be scored without a model (`score_responses`), which is
how the checkers are compared against the reference implementation.
"""
from __future__ import annotations

from pathlib import Path

from data.constraints import check_instruction, check_loose
from model.errors import SFTError
from model.files import iter_jsonl

REQUIRED_KEYS = ("prompt", "instruction_id_list", "kwargs")


def load_ifeval(path: str | Path, limit: int | None = None) -> list[dict]:
    """IFEval JSONL rows: key, prompt, instruction_id_list, kwargs (aligned with the ids)."""
    path = Path(path)
    if not path.is_file():
        raise SFTError(f"{path}: IFEval file not found (expected ifeval_input_data.jsonl)")
    items = []
    for lineno, rec in iter_jsonl(path, "IFEval file"):
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            raise SFTError(f"{path}:{lineno}: missing key(s) {missing}; IFEval lines need {list(REQUIRED_KEYS)}")
        if len(rec["kwargs"]) != len(rec["instruction_id_list"]):
            raise SFTError(f"{path}:{lineno}: {len(rec['instruction_id_list'])} instruction ids but "
                           f"{len(rec['kwargs'])} kwargs dicts; they must be aligned")
        rec.setdefault("key", lineno)
        items.append(rec)
        if limit and len(items) >= limit:
            break
    return items


def score_prompt(item: dict, response: str) -> dict:
    """Strict and loose verdict for each instruction of one prompt."""
    strict, loose = [], []
    for iid, kw in zip(item["instruction_id_list"], item["kwargs"]):
        strict.append(bool(check_instruction(iid, kw, response, prompt=item["prompt"])))
        loose.append(bool(check_loose(iid, kw, response, prompt=item["prompt"])))
    return {"key": item["key"], "instruction_id_list": item["instruction_id_list"],
            "strict": strict, "loose": loose, "response": response}


def score_responses(items: list[dict], responses: list[str]) -> dict:
    """Prompt/instruction-level strict/loose accuracy and a per-instruction table."""
    if len(items) != len(responses):
        raise SFTError(f"{len(responses)} responses for {len(items)} IFEval prompts; they must match")
    records = [score_prompt(it, r) for it, r in zip(items, responses)]
    per_type: dict[str, list[int]] = {}
    for rec in records:
        for iid, s, l in zip(rec["instruction_id_list"], rec["strict"], rec["loose"]):
            c = per_type.setdefault(iid, [0, 0, 0])
            c[0] += 1
            c[1] += s
            c[2] += l
    n_p = max(1, len(records))
    n_i = max(1, sum(len(r["strict"]) for r in records))
    metrics = {
        "prompt_strict": sum(all(r["strict"]) for r in records) / n_p,
        "inst_strict": sum(sum(r["strict"]) for r in records) / n_i,
        "prompt_loose": sum(all(r["loose"]) for r in records) / n_p,
        "inst_loose": sum(sum(r["loose"]) for r in records) / n_i,
        "n_prompts": len(records),
        "n_instructions": sum(len(r["strict"]) for r in records),
    }
    by_type = {iid: {"n": n, "strict": s / n, "loose": l / n} for iid, (n, s, l) in sorted(per_type.items())}
    rows = [[iid, v["n"], v["strict"], v["loose"]] for iid, v in by_type.items()]
    by_cat: dict[str, list[int]] = {}
    for iid, (n, s, l) in per_type.items():
        c = by_cat.setdefault(iid.split(":")[0], [0, 0, 0])
        c[0] += n
        c[1] += s
        c[2] += l
    cat_rows = [[cat, n, s / n, l / n] for cat, (n, s, l) in sorted(by_cat.items())]
    header = ["instruction", "n", "strict", "loose"]
    return {"metrics": metrics,
            "tables": {"per instruction type": {"header": header, "rows": rows},
                       "per category": {"header": ["category", "n", "strict", "loose"], "rows": cat_rows}},
            "per_type": by_type,  # the same figures by name: {instruction id: {n, strict, loose}}
            "records": records}


def evaluate_ifeval(em, path: str | Path, limit: int | None = None, max_new_tokens: int = 256,
                    batch_size: int = 8, progress=None) -> dict:
    """Generate an answer to each IFEval prompt with `em` (an EvalModel), then score them."""
    items = load_ifeval(path, limit)
    convs = [[{"role": "user", "content": it["prompt"]}] for it in items]
    responses = em.chat.replies(em.model, convs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                progress=progress)
    result = score_responses(items, responses)
    result["config"] = {"data": str(path), "limit": limit, "max_new_tokens": max_new_tokens,
                        "template": em.template}
    return result
