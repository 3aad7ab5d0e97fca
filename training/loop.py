"""A training run in three phases: `setup`, `fit`, `finish` (and `train`, which runs all three).

    setup(cfg) -> Run    seeds; the process group under torchrun; tokenizer and chat template
                         (data/chat.py); the data, tokenized and packed (training/data.py); the
                         model (full, LoRA or QLoRA), speed-ups and FSDP; the optimizer and the
                         cosine schedule. Only when all of that worked is the run folder touched
                         (a bad config never costs the user a previous run); resume loads the
                         newest step_N/ here.
    fit(run)             the optimizer steps. Each takes `grad_accum` micro-batches; their
                         trainable tokens are counted FIRST (summed over processes), then every
                         micro-batch's loss sum is divided by that one number before backward
                         (training/step.py). Then: clip the global grad norm, AdamW, lr schedule;
                         a NaN/Inf step is skipped (train.max_bad_steps); held-out loss every
                         eval.every steps; step_N/ every run.save_every steps.
    finish(run)          held-out loss after, final/ (HF folder or PEFT adapter, + merged/),
                         loss.svg, sample answers, a summary line.

Data order: the global batch of a step is `batch_size * grad_accum` rows from a stream of seeded
epoch permutations (`distributed.step_rows`), so a step's rows depend only on (seed, step):
resuming needs the step number alone, and N processes split the same micro-batches.
"""
from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data.chat import Chat, chat_for
from data.packing import PAD_SEQ_ID
from model import speedups
from model.checkpoint import check_vocab, load_pretrained, read_config
from model.errors import SFTError
from model.tokenizer import Tokenizer
from model.untrained import init_rows_to_mean, model_untrained_rows, special_ids, untrained_message
from training import checkpointing as ckpt
from training import distributed as D
from training.config import Config, save_toml
from training.data import TrainData, prepare_data
from training.metrics import MetricsLog, write_loss_svg
from training.optim import build_optimizer, build_scheduler
from training.step import forward_backward, heldout_loss, to_device, trainable_tokens

# ----------------------------------------------------------------------------- the model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SFTError("config: run.device=cuda but no CUDA device is available")
    return torch.device(name)


def load_model(cfg: Config, device: torch.device) -> nn.Module:
    """The base model with what trains: everything (full), LoRA adapters, or LoRA on NF4 (QLoRA)."""
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    if D.world_size() > 1:  # FSDP: fp32 master shards, bf16 compute via its MixedPrecisionPolicy
        dtype = torch.float32
    if cfg.model.finetune == "qlora":  # frozen base in NF4, quantized tensor by tensor as it is read
        from model.nf4 import load_quantized
        model = load_quantized(cfg.model.path, compute_dtype=dtype, device=device)
    else:
        model = load_pretrained(cfg.model.path, dtype=dtype, device=device)
    if cfg.model.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    else:
        from lora import apply_lora
        model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           targets=tuple(cfg.lora.targets))
    return model.train()


def export_merged(model, cfg: Config, adapter_dir: Path, out: Path, tok, gen_cfg: dict) -> Path:
    """Base + adapter -> one full HF model, streamed tensor by tensor (NF4 weights dequantized
    layer by layer). Under FSDP the adapters are sharded, so rank 0 rebuilds the base from disk
    and loads the adapter just saved; in one process the trained model is merged as it stands."""
    from lora import load_adapter, save_merged
    if D.world_size() > 1:
        model = load_adapter(load_model(cfg, torch.device("cpu")), adapter_dir)
    save_merged(model, out, tok, generation_config=gen_cfg)
    return out


def check_untrained_tokens(model: nn.Module, data: TrainData, tok: Tokenizer, fix: bool, log) -> None:
    """Special tokens the training rows use whose embedding rows look untrained (model/untrained.py):
    a warning, or with model.init_untrained_tokens the rows set to the mean of the trained ones."""
    real = data.train["input_ids"][data.train["seq_ids"] != PAD_SEQ_ID]
    rows = model_untrained_rows(model, special_ids(tok, torch.unique(real).tolist()))
    if rows:
        if fix:
            init_rows_to_mean(model, rows)
        log(untrained_message(tok, rows, fixed=fix))


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to n (0: leave torch's default) while the block runs."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)  # leave the caller's setting as it was

# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything a run holds between its phases."""
    cfg: Config
    device: torch.device
    chat: Chat
    data: TrainData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    metrics: MetricsLog
    run_dir: Path
    total_steps: int
    step: int = 0
    before: tuple[float, float] | None = None   # held-out (loss, ppl) before the first step
    tokens_done: int = 0
    seconds: float = 0.0
    log: Callable[..., None] = print
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def rows_per_step(self) -> int:  # global, whatever the number of processes
        return self.cfg.train.batch_size * self.cfg.train.grad_accum

    @property
    def generation_config(self) -> dict:
        return {"eos_token_id": self.chat.stop_ids}

    def amp(self):
        """bf16-mixed in one process: fp32 weights and AdamW state, matmuls in bf16 under
        autocast, loss in fp32 (model/loss.py upcasts the logits); under FSDP its
        MixedPrecisionPolicy does it instead."""
        on = self.cfg.model.dtype == "bf16-mixed" and D.world_size() == 1
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def heldout(self) -> tuple[float, float]:
        with self.amp():
            return heldout_loss(self.model, self.data.held_out, self.cfg.train.batch_size,
                                self.cfg.train.loss_chunk, self.device)


def setup(cfg: Config) -> Run:
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
    model_cfg = read_config(cfg.model.path)
    check_vocab(model_cfg, tok, str(Path(cfg.model.path) / "config.json"))
    chat = chat_for(cfg.model.path, tok, cfg.data.template, model_cfg.eos_ids)
    if chat.note:
        log(chat.note)
    if tok.chat_template is None and chat.jinja:
        tok.chat_template = chat.jinja  # saved models carry the template they learned
    data = prepare_data(cfg, chat)
    model = load_model(cfg, device)
    check_untrained_tokens(model, data, tok, cfg.model.init_untrained_tokens, log)
    if cfg.train.speedups:
        speedups.apply(model)
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

    rows_per_step = cfg.train.batch_size * cfg.train.grad_accum
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * data.n_train / rows_per_step))
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay,
                                (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio)
    scratch = tempfile.TemporaryDirectory() if rank else None  # ranks > 0 log into a throwaway folder
    metrics = MetricsLog(Path(scratch.name) if scratch else run_dir)
    run = Run(cfg, device, chat, data, model, optimizer, scheduler, metrics, run_dir, total_steps,
              log=log, scratch=scratch)
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer, scheduler, cfg.model.finetune, weights=False)
        run.step = state["step"]  # the data position: step_rows is a pure function of the step
        metrics.truncate_after(run.step)
        log(f"resumed from {latest} (step {run.step}, {run.step * rows_per_step} rows seen)")
        first = next((r for r in metrics.records if r.get("kind") == "eval"), None)
        run.before = (first["eval_loss"], first["eval_ppl"]) if first else None
    else:
        if cfg.run.resume:
            log(f"run.resume=true but {run_dir} has no checkpoint yet: starting from step 0")
        metrics.reset()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{cfg.model.path}: {n_params:,} trainable params on {device}; template {chat.template}; "
        f"{data.n_train} train rows x {cfg.data.max_seq_len} tokens, {data.n_held_out} held-out rows; "
        f"{total_steps} steps of {cfg.train.grad_accum} x {cfg.train.batch_size} rows")
    if data.held_out is not None and run.step == 0:
        run.before = run.heldout()
        log(f"held-out before: loss {run.before[0]:.4f}  ppl {run.before[1]:.2f}")
        metrics.log(kind="eval", step=0, eval_loss=run.before[0], eval_ppl=run.before[1])
    return run


def _skip_bad_step(run: Run, bar, loss: float, grad_norm: float, bad_steps: int) -> None:
    """An overflow or a poisoned batch: one update with NaN/Inf gradients would make every
    weight NaN for good. Skip it (the weights stay as they were); stop if it keeps on."""
    run.optimizer.zero_grad(set_to_none=True)
    run.metrics.log(kind="skipped", step=run.step, loss=loss, grad_norm=grad_norm)
    limit = run.cfg.train.max_bad_steps
    if bad_steps > limit:
        bar.close()
        raise SFTError(f"step {run.step}: loss {loss}, grad norm {grad_norm}: {bad_steps} non-finite "
                       f"steps, more than train.max_bad_steps={limit}; lower optim.lr or check the "
                       "data (saved checkpoints are intact)")
    bar.write(f"step {run.step}: loss {loss}, grad norm {grad_norm}: update skipped "
              f"({bad_steps} of train.max_bad_steps={limit})")


def fit(run: Run, stop_after: int | None = None) -> None:
    """The optimizer steps, from run.step to run.total_steps (or `stop_after`: a simulated crash)."""
    cfg, model, device = run.cfg, run.model, run.device
    rank, world = D.rank(), D.world_size()
    t_start, bad_steps = time.perf_counter(), 0
    bar = tqdm(total=run.total_steps, initial=run.step, disable=rank != 0, dynamic_ncols=True, desc="train")
    while run.step < run.total_steps and (stop_after is None or run.step < stop_after):
        t0 = time.perf_counter()
        rows = D.step_rows(run.data.n_train, run.step, run.rows_per_step, cfg.run.seed)
        batches = [to_device(run.data.train, mb, device)
                   for mb in D.rank_micro_batches(rows, cfg.train.batch_size, rank, world)]
        n_step = D.global_token_count(sum(trainable_tokens(b) for b in batches), device)
        with run.amp():
            loss_sum = forward_backward(model, batches, D.loss_scale(n_step), cfg.train.loss_chunk)
        grad_norm = D.clip_grad_norm([p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip)
        loss = D.all_reduce_sum(loss_sum, device) / max(n_step, 1)
        dt = time.perf_counter() - t0
        run.step += 1
        run.tokens_done += n_step
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            bad_steps += 1
            _skip_bad_step(run, bar, loss, grad_norm, bad_steps)
            bar.update(1)
            continue
        lr = run.optimizer.param_groups[0]["lr"]
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        if run.step % cfg.train.log_every == 0 or run.step == run.total_steps:
            run.metrics.log(kind="train", step=run.step, epoch=run.step * run.rows_per_step / run.data.n_train,
                            loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=n_step / dt,
                            trainable_tokens=int(n_step))
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{n_step / dt:,.0f}")
        bar.update(1)
        if (run.data.held_out is not None and cfg.eval.every and run.step % cfg.eval.every == 0
                and run.step < run.total_steps):
            el, ep = run.heldout()
            run.metrics.log(kind="eval", step=run.step, eval_loss=el, eval_ppl=ep)
            bar.write(f"step {run.step}: held-out loss {el:.4f}  ppl {ep:.2f}")
        if cfg.run.save_every and run.step % cfg.run.save_every == 0:  # every rank: collective
            ckpt.save_checkpoint(run.run_dir, run.step, model, run.optimizer, run.scheduler,
                                 {"step": run.step, "rows_seen": run.step * run.rows_per_step},
                                 tokenizer=run.chat.tokenizer, finetune=cfg.model.finetune,
                                 keep_last_n=cfg.run.keep_last_n, generation_config=run.generation_config)
            if rank == 0:
                write_loss_svg(run.metrics.records, run.run_dir / "loss.svg")
    bar.close()
    run.seconds += time.perf_counter() - t_start


def sample_answers(run: Run, convs: list) -> list[str]:
    """Greedy answers to the first user turn of each held-out conversation."""
    prompts = [c[:next(i for i, m in enumerate(c) if m["role"] == "user") + 1] for c in convs]
    replies = run.chat.replies(run.model, prompts, max_new_tokens=run.cfg.eval.max_new_tokens,
                               batch_size=len(prompts) or 1)
    return [f"  prompt: {p[-1]['content']}\n  answer: {r}" for p, r in zip(prompts, replies)]


def finish(run: Run) -> dict:
    """Held-out loss after, final/ (+ merged/), loss.svg and sample answers; the summary."""
    cfg, rank = run.cfg, D.rank()
    summary = {"run_dir": str(run.run_dir), "steps": run.step, "trainable_tokens": int(run.tokens_done),
               "seconds": run.seconds, "tokens_per_s": run.tokens_done / max(run.seconds, 1e-9),
               "eval_before": run.before[0] if run.before else None}
    if run.step < run.total_steps:  # stopped early on purpose: no final model
        run.metrics.close()
        return summary
    after = run.heldout() if run.data.held_out is not None else None
    if after:
        run.metrics.log(kind="eval", step=run.step, eval_loss=after[0], eval_ppl=after[1])
        summary["eval_after"] = after[0]
    tok, gen_cfg = run.chat.tokenizer, run.generation_config
    final = ckpt.save_final(run.run_dir, run.model, tok, cfg.model.finetune, gen_cfg)  # every rank
    summary["final"] = str(final)
    if cfg.lora.save_merged and cfg.model.finetune != "full" and rank == 0:
        summary["merged"] = str(export_merged(run.model, cfg, final, run.run_dir / "merged", tok, gen_cfg))
    if rank == 0:
        write_loss_svg(run.metrics.records, run.run_dir / "loss.svg")
    convs = run.data.held_out_conversations[:cfg.eval.sample_prompts]
    if D.world_size() > 1 and convs:
        run.log(f"sample generation is skipped under torchrun; try: python eval.py --model {final}")
    elif convs:
        for text in sample_answers(run, convs):
            run.log("sample (held-out prompt, greedy):\n" + text)
    run.metrics.close()
    held = (f"; held-out loss {run.before[0]:.4f} -> {after[0]:.4f} (ppl {run.before[1]:.2f} -> "
            f"{after[1]:.2f})" if run.before and after else "")
    run.log(f"done: {run.step} steps, {run.tokens_done:,} trainable tokens in {run.seconds:.1f}s "
            f"({summary['tokens_per_s']:,.0f} tok/s){held}; model: {final}")
    return summary


def train(cfg: Config, stop_after: int | None = None) -> dict:
    """setup -> fit -> finish; `stop_after` ends early after that step (simulates a crash)."""
    with cpu_threads(cfg.run.threads):
        run = setup(cfg)
        fit(run, stop_after)
        return finish(run)
