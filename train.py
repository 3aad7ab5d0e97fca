"""Supervised fine-tuning, one flat script: `python train.py --config configs/NAME.toml [key=value ...]`.

Read it top to bottom; it is the whole training side of the project:

  1. config   TOML + overrides -> one dataclass (training/config.py); `--help` lists the options.
  2. data     file -> conversations (data/formats.py) -> held-out split -> template + tokenize
              with labels = -100 outside assistant replies (data/masking.py) -> packed rows of
              max_seq_len tokens with position_ids and seq_ids (data/packing.py), so there is no
              padding work and samples in one row never attend to each other.
  3. model    HF folder -> Transformer (model/checkpoint.py); `trainable_parameters` decides
              what trains (full fine-tuning here; LoRA/QLoRA plug in at that one function).
  4. loop     each optimizer step takes `grad_accum` micro-batches. Their trainable tokens are
              counted FIRST (and summed over ranks when distributed), then every micro-batch's
              summed loss is divided by that one number before backward. So the gradient is
              d/dw [sum of token losses / tokens in the step], exactly what one big batch gives;
              averaging per micro-batch would over-weight tokens of short micro-batches.
              Then: clip the global grad norm, AdamW step, cosine/warmup lr step.
  5. outputs  checkpoints/<run>/: config.toml, metrics.jsonl, loss.svg, step_N/ (exact resume),
              final/ (HF layout, loads with load_pretrained).

Data order: the global batch of a step is `batch_size * grad_accum` rows taken from a stream of
seeded epoch permutations (`training/distributed.py: step_rows`), so a step's rows depend only on
(seed, step): resuming needs the step number alone, and N processes (torchrun, issue 7) split
the same micro-batches between them. Token counts, loss sums and eval sums go through that
module's all-reduce helpers, which are identities in one process. Under
`torchrun --nproc_per_node N train.py ...` the model is sharded with FSDP2 (`D.shard_model`),
every process runs grad_accum / N micro-batches of each step, and checkpoints are gathered to
rank 0 (which alone writes), loadable by any number of processes.
"""
from __future__ import annotations

import argparse
import functools
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.formats import load_conversations
from data.masking import tokenize_dataset
from data.packing import collate, pack
from data.templates import KNOWN_JINJA, render, stop_strings, template_from_tokenizer_config
from model.checkpoint import load_pretrained
from evaluation import demo
from model.cli import run_cli
from model.errors import SFTError
from model.loss import masked_ce_sum
from model.tokenizer import Tokenizer
from training import checkpointing as ckpt
from training import distributed as D
from training.config import Config, help_text, load_config, save_toml
from training.metrics import MetricsLog, write_loss_svg
from training.optim import build_optimizer, build_scheduler

# ----------------------------------------------------------------------------- data


def split_held_out(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random `fraction` of conversations held out (at least 1 when fraction > 0)."""
    if fraction <= 0:
        return convs, []
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(len(convs) * fraction))
    held = set(idx[:n_eval])
    return [c for i, c in enumerate(convs) if i not in held], [convs[i] for i in sorted(held)]


def tokenize_all(tok: Tokenizer, template: str, convs: list, max_len: int, strategy: str,
                 where: str) -> list[dict]:
    """Template + tokenize + mask; prints what was dropped and why (data/masking.py)."""
    samples, report = tokenize_dataset(tok, template, convs, max_len, strategy, source=where)
    if convs and not samples:
        raise SFTError(f"{where}: no conversation kept a trainable token (check data.template, "
                       f"data.loss_on and data.max_seq_len)")
    if D.rank() == 0:
        tqdm.write(f"{where}: {report.summary()}")
    return samples


def choose_template(cfg: Config, tok: Tokenizer) -> str:
    """data.template, or the tokenizer's chat template, or alpaca for a base model without one."""
    if cfg.data.template != "auto":
        return cfg.data.template
    if not tok.chat_template:
        return "alpaca"
    return template_from_tokenizer_config(cfg.model.path)


def stop_ids(tok: Tokenizer, template: str) -> list[int]:
    """Ids that end an assistant turn in this template (EOS, <|im_end|>, <|eot_id|>, ...).

    They go into generation_config.json so that generation stops where training taught it to.
    """
    ids = [tok.token_to_id(s) for s in stop_strings(template, tok.eos_token)]
    return sorted({i for i in ids if i is not None} | {tok.eos_id})


def load_data(cfg: Config, tok: Tokenizer, template: str):
    """-> (train rows, held-out rows, held-out conversations).

    Rows are packed once and collated once into dicts of (N, T) LongTensors (input_ids, labels,
    position_ids, seq_ids); a micro-batch is then an index_select, not a Python list copy.
    """
    convs = load_conversations(cfg.data.train, format=cfg.data.format)
    if not convs:
        raise SFTError(f"{cfg.data.train}: no conversations in the file (empty?)")
    if cfg.data.max_records:
        convs = convs[:cfg.data.max_records]
    if cfg.data.eval:
        train_convs, eval_convs = convs, load_conversations(cfg.data.eval, format=cfg.data.format)
    else:
        train_convs, eval_convs = split_held_out(convs, cfg.data.eval_fraction, cfg.run.seed)
    if not train_convs:
        raise SFTError(f"{cfg.data.train}: all {len(convs)} conversation(s) are held out; add data "
                       "or lower data.eval_fraction")
    def prepare(convs: list, where: str) -> list[dict]:
        return tokenize_all(tok, template, convs, cfg.data.max_seq_len, cfg.data.loss_on, where)
    train_samples = prepare(train_convs, cfg.data.train)
    eval_samples = prepare(eval_convs, cfg.data.eval or "held-out")
    # packing is deterministic (best-fit decreasing); each epoch then shuffles whole rows
    eval_rows = collate(pack(eval_samples, cfg.data.max_seq_len)) if eval_samples else None
    return collate(pack(train_samples, cfg.data.max_seq_len)), eval_rows, eval_convs


def trainable_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())

# ----------------------------------------------------------------------------- model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SFTError("config: run.device=cuda but no CUDA device is available")
    return torch.device(name)


def trainable_parameters(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Decide which weights train. The one place LoRA/QLoRA (issue 6) plug in."""
    if cfg.model.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
        return model
    try:
        from lora import apply_lora
    except ImportError:
        raise SFTError(f"config: model.finetune={cfg.model.finetune} needs lora.py") from None
    return apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                      targets=tuple(cfg.lora.targets))


def load_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    if D.world_size() > 1:  # FSDP: fp32 master shards, bf16 compute via its MixedPrecisionPolicy
        dtype = torch.float32
    if cfg.model.finetune == "qlora":  # frozen base in NF4, quantized tensor by tensor as it is read
        from model.nf4 import load_quantized
        model = load_quantized(cfg.model.path, compute_dtype=dtype, device=device)
    else:
        model = load_pretrained(cfg.model.path, dtype=dtype, device=device)
    return trainable_parameters(model, cfg).train()

def export_merged(model, cfg: Config, adapter_dir: Path, out: Path, tok, gen_cfg: dict) -> Path:
    """Base + adapter -> one full HF model, streamed tensor by tensor (NF4 weights are dequantized
    layer by layer). Under FSDP the adapters are sharded, so rank 0 rebuilds the base from disk
    and loads the adapter just saved; in one process the trained model is merged as it stands."""
    from lora import load_adapter, save_merged
    if D.world_size() > 1:
        model = load_adapter(load_model(cfg, torch.device("cpu")), adapter_dir)
    save_merged(model, out, tok, generation_config=gen_cfg)
    return out

# ----------------------------------------------------------------------------- one step


def to_device(data: dict[str, torch.Tensor], idx: list[int], device) -> dict[str, torch.Tensor]:
    """Rows `idx` of the pre-collated (N, T) tensors -> a (B, T) micro-batch on `device`."""
    sel = torch.tensor(idx)
    return {k: v.index_select(0, sel).to(device, non_blocking=True) for k, v in data.items()}


def forward_backward(model, batches: list[dict], scale: float, chunk: int) -> float:
    """Backprop every micro-batch's loss SUM times `scale`; returns this rank's loss sum.

    scale = 1 / (trainable tokens of the whole step) in one process; D.loss_scale(n_global)
    = world / n_global under FSDP, whose gradient averaging over ranks the factor undoes.
    """
    total = torch.zeros((), dtype=torch.float32, device=batches[0]["input_ids"].device)
    for b in batches:
        hidden = model(b["input_ids"], position_ids=b["position_ids"], seq_ids=b["seq_ids"],
                       return_hidden=True)
        loss_sum, _ = masked_ce_sum(model, hidden, b["labels"], chunk_size=chunk)
        (loss_sum * scale).backward()
        total += loss_sum.detach()
    return total.item()  # one device sync per step, not per micro-batch


@torch.no_grad()
def evaluate(model, rows: dict, batch_size: int, chunk: int, device) -> tuple[float, float]:
    """Held-out (mean loss per trainable token, perplexity), summed over ranks."""
    was_training = model.training
    model.eval()
    rank, world = D.rank(), D.world_size()
    loss, n, n_rows = 0.0, 0, len(rows["input_ids"])
    for idx in D.eval_batches(n_rows, batch_size, rank, world):
        b = to_device(rows, idx or [0], device)  # []: a forward for FSDP's collectives, not counted
        hidden = model(b["input_ids"], position_ids=b["position_ids"], seq_ids=b["seq_ids"],
                       return_hidden=True)
        s, k = masked_ce_sum(model, hidden, b["labels"], chunk_size=chunk)
        if idx:
            loss, n = loss + s.item(), n + k
    model.train(was_training)
    loss, n = D.all_reduce_sum(loss, device), D.all_reduce_sum(n, device)
    mean = loss / max(n, 1)
    return mean, math.exp(min(mean, 50.0))


def sample_answers(model, tok: Tokenizer, template: str, convs: list, max_new: int,
                   stop: list[int]) -> list[str]:
    """Greedy answers to the first user turn of each held-out conversation."""
    prompts = []
    for c in convs:
        upto = c[:next(i for i, m in enumerate(c) if m["role"] == "user") + 1]
        text = render(template, upto, add_generation_prompt=True,
                      bos_token=tok.bos_token, eos_token=tok.eos_token)
        prompts.append((upto[-1]["content"], tok.encode(text)))
    was_training = model.training
    model.eval()
    outs = model.generate([p for _, p in prompts], max_new_tokens=max_new, stop_ids=stop)
    model.train(was_training)
    return [f"  prompt: {q}\n  answer: {tok.decode(o, skip_special_tokens=True).strip()}"
            for (q, _), o in zip(prompts, outs)]

# ----------------------------------------------------------------------------- the run


def train(cfg: Config, stop_after: int | None = None) -> dict:
    """Run training as configured; `stop_after` ends early after that step (simulates a crash)."""
    threads = torch.get_num_threads()
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    try:
        return _train(cfg, stop_after)
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting as it was


def _train(cfg: Config, stop_after: int | None) -> dict:
    t_begin = time.perf_counter()
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    # under torchrun: open the process group (NCCL/gloo), one GPU per process; else a no-op
    device = D.init_distributed(pick_device(cfg.run.device).type).device
    rank, world = D.rank(), D.world_size()
    if cfg.train.grad_accum % world:
        raise SFTError(f"config: train.grad_accum={cfg.train.grad_accum} must be a multiple of the "
                       f"{world} processes (each runs grad_accum / world micro-batches)")
    log = print if rank == 0 else (lambda *a, **k: None)

    tok = Tokenizer.from_pretrained(cfg.model.path)
    template = choose_template(cfg, tok)
    if tok.chat_template is None and template in KNOWN_JINJA:
        tok.chat_template = KNOWN_JINJA[template]  # saved models carry the template they learned
    # the offline demo (configs/demo.toml): the base model writes its own training set
    demo_held = demo.prepare_data(cfg, tok, log) if cfg.demo.backtranslate else None
    train_rows, eval_rows, eval_convs = load_data(cfg, tok, template)
    if cfg.eval.max_rows and eval_rows is not None:
        eval_rows = {k: v[:cfg.eval.max_rows] for k, v in eval_rows.items()}
    n_train, n_eval = len(train_rows["input_ids"]), 0 if eval_rows is None else len(eval_rows["input_ids"])
    model = load_model(cfg, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # only now, with every input read and checked, touch the run folder (rank 0 owns it)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if rank == 0:
        ckpt.prepare_run_dir(cfg.run.out_dir, cfg.run.name, cfg.run.resume, cfg.run.overwrite)
        save_toml(cfg, run_dir / "config.toml")
    D.barrier()
    latest = ckpt.latest_checkpoint(run_dir) if cfg.run.resume else None
    if latest is not None:  # weights go in before sharding, while every tensor is whole
        ckpt.load_weights(model, latest, cfg.model.finetune)
    D.shard_model(model, mixed_precision=cfg.model.dtype != "float32",
                  activation_checkpointing=cfg.train.activation_checkpointing,
                  compile=cfg.train.compile)

    rows_per_step = cfg.train.batch_size * cfg.train.grad_accum  # global, whatever the world size
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * n_train / rows_per_step))
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay,
                                (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio)
    scratch = tempfile.TemporaryDirectory()  # ranks > 0 log into a throwaway folder
    metrics = MetricsLog(run_dir if rank == 0 else Path(scratch.name))
    step = 0
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer, scheduler, cfg.model.finetune,
                                     weights=False)
        step = state["step"]  # the data position: step_rows is a pure function of the step
        metrics.truncate_after(step)
        log(f"resumed from {latest} (step {step}, {step * rows_per_step} rows seen)")
    else:
        if cfg.run.resume:
            log(f"run.resume=true but {run_dir} has no checkpoint yet: starting from step 0")
        metrics.reset()
    log(f"{cfg.model.path}: {n_params:,} trainable params on {device}; template {template}; "
        f"{n_train} train rows x {cfg.data.max_seq_len} tokens, {n_eval} held-out rows; "
        f"{total_steps} steps of {cfg.train.grad_accum} x {cfg.train.batch_size} rows")

    chunk = cfg.train.loss_chunk
    # bf16-mixed in one process: fp32 weights and AdamW state, matmuls in bf16 under autocast,
    # loss in fp32 (model/loss.py upcasts the logits); under FSDP its MixedPrecisionPolicy does it
    amp = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                            enabled=cfg.model.dtype == "bf16-mixed" and world == 1)
    before = None
    if eval_rows is not None and step == 0:
        with amp():
            before = evaluate(model, eval_rows, cfg.train.batch_size, chunk, device)
        log(f"held-out before: loss {before[0]:.4f}  ppl {before[1]:.2f}")
        metrics.log(kind="eval", step=0, eval_loss=before[0], eval_ppl=before[1])
    elif eval_rows is not None:  # resumed: the step-0 figure is in metrics.jsonl
        first = next((r for r in metrics.records if r.get("kind") == "eval"), None)
        before = (first["eval_loss"], first["eval_ppl"]) if first else None

    demo_base = demo.score_base(model, tok, template, demo_held, cfg, log) if demo_held and step == 0 else None
    gen_cfg = {"eos_token_id": stop_ids(tok, template)}
    t_start, tokens_done, bad_steps = time.perf_counter(), 0, 0
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc="train")
    while step < total_steps and (stop_after is None or step < stop_after):
        t0 = time.perf_counter()
        rows = D.step_rows(n_train, step, rows_per_step, cfg.run.seed)
        batches = [to_device(train_rows, mb, device)
                   for mb in D.rank_micro_batches(rows, cfg.train.batch_size, rank, world)]
        n_step = D.global_token_count(sum(trainable_tokens(b) for b in batches), device)
        with amp():
            loss_sum = forward_backward(model, batches, D.loss_scale(n_step), chunk)
        grad_norm = D.clip_grad_norm([p for p in model.parameters() if p.requires_grad],
                                     cfg.optim.grad_clip)
        loss_sum = D.all_reduce_sum(loss_sum, device)
        loss, dt = loss_sum / max(n_step, 1), time.perf_counter() - t0
        step += 1
        tokens_done += n_step
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # An overflow or a poisoned batch: one update with NaN/Inf gradients would make every
            # weight NaN for good. Skip it (the weights stay as they were); stop if it keeps on.
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            metrics.log(kind="skipped", step=step, loss=loss, grad_norm=grad_norm)
            if bad_steps > cfg.train.max_bad_steps:
                bar.close()
                raise SFTError(f"step {step}: loss {loss}, grad norm {grad_norm}: {bad_steps} non-finite "
                               f"steps, more than train.max_bad_steps={cfg.train.max_bad_steps}; lower "
                               "optim.lr or check the data (saved checkpoints are intact)")
            bar.write(f"step {step}: loss {loss}, grad norm {grad_norm}: update skipped "
                      f"({bad_steps} of train.max_bad_steps={cfg.train.max_bad_steps})")
            bar.update(1)
            continue
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % cfg.train.log_every == 0 or step == total_steps:
            metrics.log(kind="train", step=step, epoch=step * rows_per_step / n_train, loss=loss,
                        lr=lr, grad_norm=grad_norm, tokens_per_s=n_step / dt, trainable_tokens=int(n_step))
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{n_step / dt:,.0f}")
        bar.update(1)
        if eval_rows is not None and cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
            with amp():
                el, ep = evaluate(model, eval_rows, cfg.train.batch_size, chunk, device)
            metrics.log(kind="eval", step=step, eval_loss=el, eval_ppl=ep)
            bar.write(f"step {step}: held-out loss {el:.4f}  ppl {ep:.2f}")
        if cfg.run.save_every and step % cfg.run.save_every == 0:  # every rank: collective
            ckpt.save_checkpoint(run_dir, step, model, optimizer, scheduler,
                                 {"step": step, "rows_seen": step * rows_per_step}, tokenizer=tok,
                                 finetune=cfg.model.finetune, keep_last_n=cfg.run.keep_last_n,
                                 generation_config=gen_cfg)
            if rank == 0:
                write_loss_svg(metrics.records, run_dir / "loss.svg")
    bar.close()
    elapsed = time.perf_counter() - t_start
    summary = {"run_dir": str(run_dir), "steps": step, "trainable_tokens": int(tokens_done),
               "seconds": elapsed, "tokens_per_s": tokens_done / max(elapsed, 1e-9),
               "eval_before": before[0] if before else None}
    if step < total_steps:  # stopped early on purpose: no final model
        metrics.close()
        return summary
    with amp():
        after = evaluate(model, eval_rows, cfg.train.batch_size, chunk, device) if eval_rows is not None else None
    if after:
        metrics.log(kind="eval", step=step, eval_loss=after[0], eval_ppl=after[1])
        summary["eval_after"] = after[0]
    final = ckpt.save_final(run_dir, model, tok, cfg.model.finetune, gen_cfg)  # every rank
    summary["final"] = str(final)
    if cfg.lora.save_merged and cfg.model.finetune != "full" and rank == 0:
        summary["merged"] = str(export_merged(model, cfg, final, run_dir / "merged", tok, gen_cfg))
    if rank == 0:
        write_loss_svg(metrics.records, run_dir / "loss.svg")
    if world > 1 and cfg.eval.sample_prompts and eval_convs:
        log(f"sample generation is skipped under torchrun; try: python eval.py --model {final}")
    elif cfg.eval.sample_prompts and eval_convs:
        for text in sample_answers(model, tok, template, eval_convs[:cfg.eval.sample_prompts],
                                   cfg.eval.max_new_tokens, gen_cfg["eos_token_id"]):
            log("sample (held-out prompt, greedy):\n" + text)
    metrics.close()
    held = (f"; held-out loss {before[0]:.4f} -> {after[0]:.4f} (ppl {before[1]:.2f} -> {after[1]:.2f})"
            if before and after else "")
    log(f"done: {step} steps, {tokens_done:,} trainable tokens in {elapsed:.1f}s "
        f"({summary['tokens_per_s']:,.0f} tok/s){held}; model: {summary.get('final', '-')}")
    if demo_base is not None:  # before/after table, demo.svg, and the demo's last line (JSON)
        summary["demo"] = demo.finish(model, tok, template, demo_held, demo_base, cfg, run_dir, t_begin)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fine-tune a Llama-family model on instruction data.",
        usage="python train.py --config configs/NAME.toml [section.key=value ...] [--debug]",
        epilog="config options (section.key, default, meaning):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file with [run], [model], [data], ... sections")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of SFTError")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied after the file")
    args = parser.parse_args(argv)
    status = 1
    try:
        status = run_cli(lambda: train(load_config(args.config, args.overrides)), args.debug)
        return status
    finally:
        D.teardown(clean=status == 0)


if __name__ == "__main__":
    sys.exit(main())
