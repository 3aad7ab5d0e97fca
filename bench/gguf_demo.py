"""The demo's tuned model in llama.cpp: same answers as ours?

    python demo.py --config configs/demo.toml                 # writes checkpoints/demo/ (merged/, demo-q8_0.gguf)
    <parity venv>/bin/python bench/gguf_demo.py [--run checkpoints/demo] [--type q8_0]

llama.cpp runs the exported file through llama-cpp-python (the parity extra; never a dependency):
for each held-out demo prompt it renders the chat template stored in the GGUF file (Jinja, as
llama.cpp and Ollama do), tokenizes, and decodes greedily up to the same token limit as the demo
(96), stopping at EOS and cutting at the template's stop strings as our data/chat.py does. Its
answers are scored with the same IFEval checkers (evaluation/ifeval.py) and compared text for
text with ours (the tuned model's answers in <run>/demo.json). A type other than the run's own
is exported from <run>/merged/ into a temporary folder first.

Greedy decoding is a chain: one flipped argmax changes every later token, so a quantized file
(q8_0: ~0.1 absolute error in the logits) can part from ours on a few prompts and still score
alike; an f32 file should give identical text. Measured (README): f32 100/100 identical, q8_0
86/100 identical, pass rate 0.49 in llama.cpp vs 0.50 ours.

llama.cpp repacks Q8_0/Q4_0 weights for AMX tile instructions when the CPU reports them; in some
sandboxes that dies with SIGILL, so the "extra buffer types" are turned off (the products are
the same). Ends with one JSON line.
"""
from __future__ import annotations

import os
import sys

# run as a script, sys.path[0] is bench/: the repository root goes there instead
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from data.chat import chat_for, cut_at_stop  # noqa: E402
from evaluation.ifeval import load_ifeval, score_responses  # noqa: E402
from model.gguf import export_gguf  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402


def open_llama(path: Path):
    import llama_cpp
    default = llama_cpp.llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default()
        params.use_extra_bufts = False
        return params
    llama_cpp.llama_cpp.llama_model_default_params = plain_buffers
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)


def llama_answer(llm, formatter, prompt: str, stops: list[str], max_new_tokens: int) -> str:
    text = formatter(messages=[{"role": "user", "content": prompt}]).prompt
    llm.reset()
    llm.eval(llm.tokenize(text.encode(), add_bos=False, special=True))
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        if token == llm.token_eos():
            break
        out.append(token)
        llm.eval([token])
    return cut_at_stop(llm.detokenize(out).decode("utf-8", "replace"), stops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="checkpoints/demo", help="the demo's run folder")
    ap.add_argument("--type", default="q8_0", help="GGUF type: the run's file, else exported from merged/")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    run = Path(args.run)
    ours = json.loads((run / "demo.json").read_text())["tuned"]["records"]
    items = load_ifeval(run.parent / f"{run.name}-data" / "demo_heldout.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = run / f"{run.name}-{args.type}.gguf"
        if not gguf.exists():
            gguf = export_gguf(run / "merged", Path(tmp) / gguf.name, args.type).path
        llm = open_llama(gguf)
        tok = Tokenizer.from_pretrained(run / "merged")
        chat = chat_for(run / "merged", tok)
        formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"],
                                        eos_token=tok.eos_token, bos_token=tok.bos_token or "")
        texts = [llama_answer(llm, formatter, it["prompt"], chat.stop_strings, args.max_new_tokens)
                 for it in items]
        llm.close()
    same = sum(a.strip() == b["response"].strip() for a, b in zip(texts, ours))
    theirs = score_responses(items, texts)["metrics"]["prompt_strict"]
    mine = sum(all(r["strict"]) for r in ours) / len(ours)
    print(f"{gguf.name}: {len(items)} held-out prompts; pass rate (prompt-level strict) llama.cpp "
          f"{theirs:.2f}, ours {mine:.2f}; identical greedy answers {same}/{len(items)}")
    print(json.dumps({"gguf_type": args.type, "llama_cpp_pass_rate": round(theirs, 4),
                      "ours_pass_rate": round(mine, 4), "identical_answers": same, "n_items": len(items)}))


if __name__ == "__main__":
    main()
