"""Evaluate a base or fine-tuned model: held-out loss, IFEval, multiple choice, judged pairs, chat.

    python eval.py --model DIR [--adapter DIR] --tasks loss,samples,ifeval,mc,judge [--limit N]
                   [--data FILE] [--out DIR]
    python eval.py chat --model DIR [--adapter DIR]        # interactive, streams tokens
    python eval.py compare A B [--out DIR]                 # two eval.json side by side, deltas

Tasks (each lives in evaluation/<task>.py and returns {"metrics": {...}, ...}):
  loss     masked loss / perplexity on --data (the training masking, packed rows)
  samples  replies to a few prompts (the first user turns of --data, or built-in ones)
  ifeval   verifiable instruction following, prompt/instruction level, strict/loose
  mc       multiple choice by log-likelihood (MMLU), acc and acc_norm, k-shot
  judge    pairwise win/tie/loss against --against DIR or --reference FILE, judged in both orders
  toolcall for each assistant turn of --data: is the generated tool call parseable, the right
           function, with the right arguments (exact JSON match); no call where text is expected

Generative tasks prompt the model with its own chat template; a base model without one uses
--template (default alpaca) and the report says so. Results go to --out (eval.json, eval.md,
eval.svg and, for generative tasks, the responses). A mistake in the input (missing file, bad
JSON line, unknown task) prints one line and exits with status 2; --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from model.cli import ArgParser, number, run_cli
from model.errors import SFTError

ROOT = Path(__file__).resolve().parent
SHARED_DATA = Path(os.environ.get("SFT_SHARED_DIR", ROOT.parent / "shared")) / "data"
TASKS = ("loss", "samples", "ifeval", "mc", "judge", "toolcall")
SAMPLE_PROMPTS = ["Give three tips for staying healthy.", "Write a short story about a brave mouse.",
                  "What is the capital of France?"]


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (no "(default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if any(action.default is d for d in (None, False, argparse.SUPPRESS)) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _room_for_a_prompt(args, em) -> None:
    """--max-new-tokens must leave the prompt some of the model's positions."""
    positions = em.model.config.max_position_embeddings
    if args.max_new_tokens >= positions:
        raise SFTError(f"--max-new-tokens {args.max_new_tokens}: leaves no room for a prompt in the model's "
                       f"{positions} positions (max_position_embeddings of {Path(args.model) / 'config.json'}); "
                       "lower it")


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="eval.py", description=__doc__.split("\n\n")[0],
                                formatter_class=_Help,
                                epilog="Subcommands: `eval.py chat --help`, `eval.py compare --help`.")
    p.add_argument("--model", required=True, help="Hugging Face-format model folder")
    p.add_argument("--adapter", help="LoRA adapter folder (PEFT layout) applied on top of --model")
    p.add_argument("--tasks", help=f"comma list of {','.join(TASKS)} (default: loss,samples with --data, "
                                   "else ifeval,mc)")
    p.add_argument("--limit", type=number(int, 1), help="at most N items per task (a seeded subset for mc)")
    p.add_argument("--data", help="held-out conversations for loss, samples and toolcall (any format "
                   "data.formats reads)")
    p.add_argument("--out", help="output folder (default: runs/eval/<model>, where <model> is the "
                   "folder name, with its run's name for final/, merged/ and step_N/)")
    p.add_argument("--template", help="chat template name; default: the model's own, else alpaca")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=256, help="tokens generated per reply")
    p.add_argument("--batch-size", type=number(int, 1), default=8, help="prompts (or MC rows) per forward batch")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights and compute dtype")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed for sampling and MC subsets")
    p.add_argument("--threads", type=number(int, 0), default=0, help="CPU threads for torch (0: torch's "
                   "default); on an oversubscribed machine 1 can be much faster than 2")
    p.add_argument("--max-len", type=number(int, 8), help="token limit per held-out conversation "
                   "(default: the model's context length)")
    p.add_argument("--samples", type=number(int, 1), default=3, help="how many sample generations")
    p.add_argument("--ifeval-data", default=str(SHARED_DATA / "ifeval_input_data.jsonl"),
                   help="IFEval prompts (input_data.jsonl layout)")
    p.add_argument("--mc-data", default=str(SHARED_DATA / "mmlu_test.jsonl"), help="multiple-choice items")
    p.add_argument("--mc-dev", default=str(SHARED_DATA / "mmlu_dev.jsonl"), help="k-shot examples")
    p.add_argument("--mc-limit", type=number(int, 1), help="items for mc (overrides --limit for mc only)")
    p.add_argument("--k-shot", type=number(int, 0), default=0, help="solved examples before each MC question")
    p.add_argument("--mc-style", default="letter", choices=("letter", "text"),
                   help="score the letters ' A'..' D' or the answer texts")
    p.add_argument("--judge-data", default=str(SHARED_DATA / "mt_bench_question.jsonl"),
                   help="questions for the judge task (MT-Bench layout)")
    p.add_argument("--judge", help="judge: a local model folder or an OpenAI-compatible base URL")
    p.add_argument("--judge-model", default="", help="model name sent to the judge endpoint")
    p.add_argument("--judge-retries", type=number(int, 0), default=4, help="endpoint retries (backoff 1, 2, 4.. s)")
    p.add_argument("--judge-timeout", type=number(float, 0.001), default=120.0, help="seconds per endpoint request")
    p.add_argument("--against", help="second model folder that answers the same prompts")
    p.add_argument("--against-adapter", help="LoRA adapter for --against")
    p.add_argument("--reference", help="reference answers JSONL (question_id + turns/answer) instead of --against")
    p.add_argument("--turns", type=number(int, 1), default=1, help="user turns per judge question (MT-Bench has 2)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _device(name: str) -> str:
    import torch
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _set_threads(n: int) -> None:
    if n > 0:
        import torch
        torch.set_num_threads(n)


def _tasks(args) -> list[str]:
    raw = args.tasks or ("loss,samples" if args.data else "ifeval,mc")
    tasks = [t.strip() for t in raw.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise SFTError(f"--tasks: unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    for task in ("loss", "toolcall"):
        if task in tasks and not args.data:
            raise SFTError(f"--tasks {task} needs --data FILE (held-out conversations)")
    return tasks


def _progress(desc: str, total: int):
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    return bar, bar.update


def _make_judge(args, device: str):
    """data.teacher.Teacher for --judge: an http(s) base URL (…/v1) or a local model folder.
    Verdicts are cached in the output folder, so a rerun only asks what is missing."""
    from data.teacher import Teacher
    if not args.judge:
        raise SFTError("--tasks judge needs --judge (a model folder or an OpenAI-compatible base URL "
                       "such as http://127.0.0.1:8000/v1)")
    cache = str(Path(args.out) / "judge_cache.jsonl")
    if args.judge.startswith(("http://", "https://")):
        return Teacher(base_url=args.judge, model_name=args.judge_model or "default", cache_path=cache,
                       max_retries=args.judge_retries, timeout=args.judge_timeout)
    if not (Path(args.judge) / "config.json").is_file():
        raise SFTError(f"--judge {args.judge}: neither an http(s) URL nor a model folder with config.json")
    return Teacher(model_dir=args.judge, cache_path=cache, device=device)


def task_judge(args, em, device: str) -> dict:
    from evaluation.generation import load_eval_model
    from evaluation.judge import answer_questions, load_questions, load_reference_answers, run_judge
    if bool(args.against) == bool(args.reference):
        raise SFTError("--tasks judge needs exactly one opponent: --against DIR or --reference FILE")
    judge = _make_judge(args, device)
    questions = load_questions(args.judge_data, args.limit)
    short = [q["id"] for q in questions if len(q["turns"]) < args.turns]
    if short:
        raise SFTError(f"{args.judge_data}: questions {short[:5]} have fewer than --turns {args.turns} turns")

    def gen_for(em):
        return lambda convs: em.chat.replies(em.model, convs, args.max_new_tokens, args.batch_size, seed=args.seed)
    answers_m = answer_questions(gen_for(em), questions, args.turns)
    if args.against:
        other = load_eval_model(args.against, args.against_adapter, args.template, args.dtype, device)
        answers_o, opponent = answer_questions(gen_for(other), questions, args.turns), args.against
    else:
        ref = load_reference_answers(args.reference)
        missing = [q["id"] for q in questions if q["id"] not in ref]
        if missing:
            raise SFTError(f"{args.reference}: no answer for question_id(s) {missing[:5]}")
        answers_o, opponent = [ref[q["id"]][:args.turns] for q in questions], args.reference
    result = run_judge(judge, questions, answers_m, answers_o, n_turns=args.turns)
    result["config"] = {"questions": args.judge_data, "opponent": opponent, "judge": args.judge,
                        "turns": args.turns}
    return result


def task_samples(args, em) -> dict:
    from data.formats import load_conversations
    if args.data:
        convs = [c for c in load_conversations(args.data) if c and any(m["role"] == "user" for m in c)]
        prompts, refs = [], []
        for c in convs[:args.samples]:
            first_user = next(i for i, m in enumerate(c) if m["role"] == "user")
            prompts.append(c[:first_user + 1])
            refs.append(c[first_user + 1]["content"] if len(c) > first_user + 1 else None)
    else:
        prompts = [[{"role": "user", "content": t}] for t in SAMPLE_PROMPTS[:args.samples]]
        refs = [None] * len(prompts)
    replies = em.chat.replies(em.model, prompts, args.max_new_tokens, args.batch_size, seed=args.seed)
    recs = [{"prompt": p[-1]["content"], "reply": r, "reference": ref}
            for p, r, ref in zip(prompts, replies, refs)]
    return {"metrics": {}, "samples": recs}


def task_toolcall(args, em) -> dict:
    from data.formats import load_conversations
    from data.tool_templates import parse_tool_calls
    from evaluation.toolcall import evaluate_toolcalls, toolcall_prompts
    convs = load_conversations(args.data)
    n = len(toolcall_prompts(convs)) if args.limit is None else min(args.limit, len(toolcall_prompts(convs)))
    bar, tick = _progress("toolcall", n)
    res = evaluate_toolcalls(
        convs, lambda prompts: em.chat.replies(em.model, prompts, args.max_new_tokens, args.batch_size,
                                               seed=args.seed, progress=tick),
        lambda text: parse_tool_calls(em.template, text), args.limit)
    bar.close()
    res["config"].update(data=str(args.data), template=em.template)
    return res


def run_tasks(args) -> dict:
    from evaluation.generation import load_eval_model
    tasks, device = _tasks(args), _device(args.device)
    _set_threads(args.threads)
    em = load_eval_model(args.model, args.adapter, args.template, args.dtype, device)
    if set(tasks) & {"samples", "ifeval", "judge", "toolcall"}:
        _room_for_a_prompt(args, em)
    # MC scores raw text (no template), so the template note only matters for the other tasks.
    notes = list(em.notes) if set(tasks) - {"mc"} else []
    result = {"model": args.model, "adapter": args.adapter, "template": em.template, "notes": notes,
              "device": device, "dtype": args.dtype, "limit": args.limit, "tasks": {}}
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for task in tasks:
        t0 = time.perf_counter()
        if task == "loss":
            from data.formats import load_conversations
            from evaluation.loss import heldout_loss
            convs = load_conversations(args.data)[:args.limit]
            res = heldout_loss(em.model, em.tokenizer, em.template, convs, args.max_len,
                               args.batch_size, source=args.data)
        elif task == "samples":
            res = task_samples(args, em)
        elif task == "ifeval":
            from evaluation.ifeval import evaluate_ifeval, load_ifeval
            bar, tick = _progress("ifeval", len(load_ifeval(args.ifeval_data, args.limit)))
            res = evaluate_ifeval(em, args.ifeval_data, args.limit, args.max_new_tokens, args.batch_size, tick)
            bar.close()
        elif task == "mc":
            from evaluation.mc import evaluate_mc
            res = evaluate_mc(em.model, em.tokenizer, args.mc_data, args.mc_dev, args.k_shot,
                              args.mc_limit or args.limit, args.mc_style, args.batch_size, args.seed)
        elif task == "toolcall":
            res = task_toolcall(args, em)
        else:
            res = task_judge(args, em, device)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        result["tasks"][task] = res
        shown = ", ".join(f"{k}={v:.4g}" for k, v in res["metrics"].items())
        print(f"{task}: {shown} ({res['seconds']}s)", file=sys.stderr)
    return result


def _folder_name(path: str) -> str:
    """A folder's name, qualified by its run's name when the name alone says nothing
    (`checkpoints/quickstart/final` -> `quickstart-final`), so reports of two runs never collide."""
    p = Path(path).resolve()
    generic = p.name in ("final", "merged") or p.name.startswith("step_")
    return f"{p.parent.name}-{p.name}" if generic else p.name


def report_name(model: str, adapter: str | None) -> str:
    return _folder_name(model) + (f"+{_folder_name(adapter)}" if adapter else "")


def cmd_eval(argv: list[str]) -> int:
    from evaluation.report import to_markdown, write_report
    args = build_parser().parse_args(argv)
    args.out = str(args.out or ROOT / "runs" / "eval" / report_name(args.model, args.adapter))
    result = run_tasks(args)
    paths = write_report(result, args.out)
    headline = {t: {"metrics": r["metrics"]} for t, r in result["tasks"].items()}
    print(to_markdown(dict(result, tasks=headline)))  # details stay in eval.md
    for rec in result["tasks"].get("samples", {}).get("samples", []):
        print(f"### {rec['prompt']}\n{rec['reply']}\n")
    print(f"wrote {paths['json']}, {paths['md']}, {paths['svg']}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    from evaluation.report import compare_markdown, load_result, write_compare
    p = ArgParser(prog="eval.py compare", description="Two eval.json side by side, with deltas.")
    p.add_argument("a", help="eval folder or eval.json (e.g. the base model)")
    p.add_argument("b", help="eval folder or eval.json (e.g. the tuned model)")
    p.add_argument("--names", default="base,tuned", help="column names for A and B")
    p.add_argument("--out", help="also write compare.md/json/svg here")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    names = args.names.split(",")
    if len(names) != 2:
        raise SFTError(f"--names {args.names!r}: give two names separated by a comma")
    a, b = load_result(args.a), load_result(args.b)
    print(compare_markdown(a, b, *names))
    if args.out:
        print(f"wrote {write_compare(a, b, args.out, *names)['md']}")
    return 0


CHAT_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit"


def cmd_chat(argv: list[str]) -> int:
    p = ArgParser(prog="eval.py chat", formatter_class=_Help,
                                description=f"Chat with a model in the terminal (streams tokens). {CHAT_HELP}.")
    p.add_argument("--model", required=True, help="Hugging Face-format model folder")
    p.add_argument("--adapter", help="LoRA adapter folder applied on top of --model")
    p.add_argument("--template", help="chat template name; default: the model's own, else alpaca")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=256, help="tokens per reply at most")
    p.add_argument("--temperature", type=number(float, 0), default=0.7, help="0: greedy")
    p.add_argument("--top-p", type=number(float, 0.001, 1.0), default=0.9, help="nucleus sampling mass")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    p.add_argument("--threads", type=number(int, 0), default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    _set_threads(args.threads)
    from evaluation.generation import load_eval_model
    em = load_eval_model(args.model, args.adapter, args.template, args.dtype, _device(args.device))
    _room_for_a_prompt(args, em)
    print(f"chatting with {args.model}{' + ' + args.adapter if args.adapter else ''} "
          f"(template {em.template}). {CHAT_HELP}; Ctrl-C stops a reply, Ctrl-D leaves.")
    for note in em.notes:
        print(f"note: {note}")
    chat_loop(em, args, input, sys.stdout)
    return 0


def chat_loop(em, args, read=input, out=sys.stdout) -> list[dict]:
    """Read user lines, stream each reply; returns the conversation (for tests)."""
    from data.chat import cut_at_stop
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    chat = em.chat
    limit = em.model.config.max_position_embeddings - args.max_new_tokens
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            out.write("(conversation reset)\n")
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            system = [{"role": "system", "content": text}] if text else []
            history = []
            out.write(f"(system message {'set' if text else 'removed'}; conversation reset)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {CHAT_HELP}\n")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = chat.prompt_ids(system + history)[-limit:]
        new, shown = [], ""
        out.write("bot> ")
        try:
            for tok in em.model.stream(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_p=args.top_p, stop_ids=chat.stop_ids):
                new.append(tok)
                text = em.tokenizer.decode(new)  # decode the whole reply: a lone piece loses its space
                if any(s in text for s in chat.stop_strings):
                    break
                out.write(text[len(shown):])
                out.flush()
                shown = text
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            out.write(" [interrupted]")
        out.write("\n")
        history.append({"role": "assistant", "content": cut_at_stop(em.tokenizer.decode(new), chat.stop_strings)})
    return system + history


def main(argv: list[str] | None = None) -> int:
    """Dispatch to eval / chat / compare; a mistake in the input is one line and status 2, Ctrl-C
    (outside a chat reply) 130 (model/cli.py)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"chat": cmd_chat, "compare": cmd_compare}
    if argv and argv[0] in commands:
        return run_cli(lambda: commands[argv[0]](argv[1:]), "--debug" in argv, prog="eval.py")
    return run_cli(lambda: cmd_eval(argv), "--debug" in argv, prog="eval.py")


if __name__ == "__main__":
    sys.exit(main())
