"""A training run in three phases: `setup`, `fit`, `finish` (and `train`, which runs all three).

    setup(cfg) -> Run    seeds; the process group under torchrun; tokenizer and chat template
                         (data/chat.py); the data, tokenized and packed (training/data.py); the
                         model (full, LoRA or QLoRA; its vocab and context checked against the
                         tokenizer and data.max_seq_len), speed-ups and FSDP; the optimizer and
                         the cosine schedule; on resume the newest usable step_N/, refused if
                         the settings that shape training changed (training/checkpointing.py).
                         Only when all of that worked is the run folder taken: locked, and an
                         earlier run in it kept until this one has saved (training/run_folder.py).
    fit(run)             the optimizer steps. Each takes `grad_accum` micro-batches; their
                         trainable tokens are counted FIRST (summed over processes), then every
                         micro-batch's loss sum is divided by that one number before backward
                         (training/step.py). Then: clip the global grad norm, AdamW, lr schedule;
                         a NaN/Inf step is skipped (train.max_bad_steps); held-out loss every
                         eval.every steps; step_N/ every run.save_every steps.
    finish(run)          held-out loss after, final/ (HF folder or PEFT adapter, + merged/),
                         loss.svg, sample answers, a summary line. A run whose every step was
                         skipped, or whose loss ends NaN/Inf, is refused: no final/ (check_learned).

Data order: the global batch of a step is `batch_size * grad_accum` rows from a stream of seeded
epoch permutations (`distributed.step_rows`), so a step's rows depend only on (seed, step):
resuming needs the step number alone, and N processes split the same micro-batches (finer
ones when grad_accum is not a multiple of N: `split_step`).
"""
from __future__ import annotations

import contextlib
import math
import random
import shutil
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
from model.cli import Interrupted
from model.errors import SFTError
from model.files import atomic_write_json
from model.tokenizer import Tokenizer
from model.untrained import init_rows_to_mean, model_untrained_rows, special_ids, untrained_message
from training import checkpointing as ckpt
from training import distributed as D
from training.config import Config, save_toml
from training.data import TrainData, prepare_data
from training.metrics import MetricsLog, write_loss_svg
from training.optim import build_optimizer, build_scheduler
from training.run_folder import RunFolder
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
    # only the special ids can be flagged: look for those (a small set) among the real tokens,
    # not for every distinct id (sorting 10^8 tokens takes seconds and a copy of them)
    ids = data.train["input_ids"]
    marked = torch.tensor(sorted(special_ids(tok, range(int(ids.max()) + 1))), dtype=ids.dtype)
    found = torch.isin(ids, marked) & (data.train["seq_ids"] != PAD_SEQ_ID)
    rows = model_untrained_rows(model, set(ids[found].unique().tolist()))
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
    folder: RunFolder
    micro_batch: int                            # rows per micro-batch (train.batch_size, or finer: split_step)
    settings: dict = field(default_factory=dict)  # what shapes training, stored in every checkpoint
    step: int = 0
    before: tuple[float, float] | None = None   # held-out (loss, ppl) before the first step
    first_bad: str = ""                         # the first skipped step, said when a run is refused
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

    def heldout(self, rows=None) -> tuple[float, float]:
        """(loss, perplexity) on the held-out rows (or on `rows`)."""
        with self.amp():
            return heldout_loss(self.model, self.data.held_out if rows is None else rows,
                                self.cfg.train.batch_size, self.cfg.train.loss_chunk, self.device)

    @property
    def last_checkpoint(self) -> Path | None:
        return ckpt.latest_checkpoint(self.run_dir)


def split_step(batch_size: int, grad_accum: int, world: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step) for `world` processes. Every process must
    run as many micro-batches as the others, so their number must be a multiple of world: the
    user's split when grad_accum is one, else the same rows per step cut into smaller
    micro-batches (8 x 1 on 2 processes: 4 x 2). The step's rows, hence its gradient, are the
    same either way (up to the order of float sums)."""
    if grad_accum % world == 0:
        return batch_size, grad_accum
    rows = batch_size * grad_accum
    accum = math.lcm(grad_accum, world)
    if rows % accum == 0:
        return rows // accum, accum
    up = -(-grad_accum // world) * world
    raise SFTError(f"config: train.batch_size={batch_size} x train.grad_accum={grad_accum} = {rows} rows per step "
                   f"do not split evenly over {world} processes; pass train.grad_accum={up} (a multiple of "
                   f"{world}: {batch_size * up} rows per step) or a train.batch_size that {world} divides")


def setup(cfg: Config) -> Run:
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.resume and cfg.run.overwrite:
        raise SFTError("config: run.resume=true continues the run, run.overwrite=true replaces it; pass one")
    # under torchrun: open the process group (NCCL/gloo), one GPU per process; else a no-op
    device = D.init_distributed(pick_device(cfg.run.device).type).device
    if cfg.train.compile and device.type == "cpu" and not any(map(shutil.which, ("g++", "clang++", "c++"))):
        # inductor writes C++ for CPU kernels; without a compiler it fails deep in the first step
        raise SFTError("config: train.compile=true on the CPU needs a C++ compiler (g++ or clang++) on PATH; "
                       "install one or set train.compile=false")
    rank, world = D.rank(), D.world_size()
    micro_batch, accum = split_step(cfg.train.batch_size, cfg.train.grad_accum, world)
    log = print if rank == 0 else (lambda *a, **k: None)
    if accum != cfg.train.grad_accum:
        log(f"note: {world} processes: each step's {micro_batch * accum} rows run as {accum} micro-batches of "
            f"{micro_batch} (train.grad_accum={cfg.train.grad_accum} is not a multiple of {world})")

    # 1. read and check every input; nothing is written yet
    config_json = Path(cfg.model.path) / "config.json"
    if not config_json.is_file():
        raise SFTError(f"model.path={cfg.model.path}: not a model folder (no config.json); give a Hugging Face-format "
                       "checkpoint such as checkpoints/pico-base")
    tok = Tokenizer.from_pretrained(cfg.model.path)
    model_cfg = read_config(cfg.model.path)
    check_vocab(model_cfg, tok, str(Path(cfg.model.path) / "config.json"))
    chat = chat_for(cfg.model.path, tok, cfg.data.template, model_cfg.eos_ids)
    if chat.note:
        log(chat.note)
    if tok.chat_template is None and chat.jinja:
        tok.chat_template = chat.jinja  # saved models carry the template they learned
    model = load_model(cfg, device)  # first: a bad model fails before data work is spent (and cached)
    if cfg.data.max_seq_len > model.config.max_position_embeddings:
        raise SFTError(f"config: data.max_seq_len={cfg.data.max_seq_len} is longer than the model's "
                       f"max_position_embeddings {model.config.max_position_embeddings} ({config_json}); lower it")
    data = prepare_data(cfg, chat)
    check_untrained_tokens(model, data, tok, cfg.model.init_untrained_tokens, log)
    if cfg.train.speedups:
        speedups.apply(model, compiled=cfg.train.compile)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    rows_per_step = cfg.train.batch_size * cfg.train.grad_accum
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * data.n_train / rows_per_step))
    # stored in every checkpoint, compared on resume (hashing the data files: ~1 s per GB)
    settings = ckpt.shaping_settings(cfg) if cfg.run.resume or cfg.run.save_every else {}
    found = (ckpt.resume_point(run_dir, model, cfg.model.finetune, settings, total_steps, log)
             if cfg.run.resume else None)  # weights go in before sharding, while every tensor is whole
    D.shard_model(model, mixed_precision=cfg.model.dtype != "float32",
                  activation_checkpointing=cfg.train.activation_checkpointing,
                  compile=cfg.train.compile)
    optimizer = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay,
                                (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.eps)
    scheduler = build_scheduler(optimizer, cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio)
    if found:
        ckpt.restore_state(found[1], found[0], model, optimizer, scheduler)

    # 2. only now, with everything read and checked, take the run folder (training/run_folder.py)
    folder = RunFolder.open(run_dir, cfg.run.resume, cfg.run.overwrite, found is not None, log)
    try:
        scratch = tempfile.TemporaryDirectory() if rank else None  # ranks > 0 log into a throwaway folder
        if rank == 0:
            save_toml(cfg, run_dir / "config.toml")
            atomic_write_json(run_dir / "data_report.json", data.report)
        metrics = MetricsLog(Path(scratch.name) if scratch else run_dir)
        run = Run(cfg, device, chat, data, model, optimizer, scheduler, metrics, run_dir, total_steps, folder,
                  micro_batch, settings, log=log, scratch=scratch)
        if found:
            latest, state = found
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
    except BaseException:
        folder.close(failed=True)
        raise
    return run


def _skip_bad_step(run: Run, bar, loss: float, grad_norm: float, bad_steps: int) -> None:
    """An overflow or a poisoned batch: one update with NaN/Inf gradients would make every
    weight NaN for good. Skip it (the weights stay as they were); stop if it keeps on."""
    run.optimizer.zero_grad(set_to_none=True)
    run.metrics.log(kind="skipped", step=run.step, loss=loss, grad_norm=grad_norm)
    run.first_bad = run.first_bad or f"step {run.step}: loss {loss}, grad norm {grad_norm}"
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
    try:  # the bar ends its line even when a step fails, so the error line stands alone
        while run.step < run.total_steps and (stop_after is None or run.step < stop_after):
            t0 = time.perf_counter()
            rows = D.step_rows(run.data.n_train, run.step, run.rows_per_step, cfg.run.seed)
            batches = [to_device(run.data.train, mb, device)
                       for mb in D.rank_micro_batches(rows, run.micro_batch, rank, world)]
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
                                     keep_last_n=cfg.run.keep_last_n, generation_config=run.generation_config,
                                     extra={"settings": run.settings})
                run.folder.saved()
                if rank == 0:
                    write_loss_svg(run.metrics.records, run.run_dir / "loss.svg")
    finally:
        bar.close()
    run.seconds += time.perf_counter() - t_start


def sample_answers(run: Run, convs: list) -> list[str]:
    """Greedy answers to the first user turn of each held-out conversation."""
    prompts = [c[:next(i for i, m in enumerate(c) if m["role"] == "user") + 1] for c in convs]
    replies = run.chat.replies(run.model, prompts, max_new_tokens=run.cfg.eval.max_new_tokens,
                               batch_size=len(prompts) or 1)
    return [f"  prompt: {p[-1]['content']}\n  answer: {r}" for p, r in zip(prompts, replies)]


def check_learned(run: Run, after: tuple[float, float]) -> None:
    """Refuse to save a model that learned nothing or diverged: without this, a NaN base weight
    or optim.lr=1e9 "trains" to the end with every step skipped and writes a final/ anyway."""
    cfg, updates = run.cfg, run.scheduler.last_epoch  # the scheduler steps once per applied update
    if updates == 0:
        raise SFTError(f"all {run.step} steps were skipped, their loss or gradient NaN/Inf ({run.first_bad}): "
                       f"nothing was learned, no final/ written; look for NaN/Inf weights in model.path="
                       f"{cfg.model.path}, or lower optim.lr={cfg.optim.lr:g}")
    if not math.isfinite(after[0]):
        where = "held-out" if run.data.held_out is not None else "training"
        skipped = f"; {run.step - updates} skipped, the first {run.first_bad}" if run.first_bad else ""
        raise SFTError(f"the model diverged: its {where} loss after {run.step} steps is {after[0]}{skipped}; "
                       f"no final/ written; lower optim.lr={cfg.optim.lr:g}")


def eval_command(cfg: Config, final: Path) -> str:
    """The command that evaluates a finished run's model (an adapter needs its base)."""
    if cfg.model.finetune == "full":
        return f"python eval.py --model {final}"
    return f"python eval.py --model {cfg.model.path} --adapter {final}"


def finish(run: Run) -> dict:
    """Held-out loss after, final/ (+ merged/), loss.svg and sample answers; the summary."""
    cfg, rank = run.cfg, D.rank()
    summary = {"run_dir": str(run.run_dir), "steps": run.step, "trainable_tokens": int(run.tokens_done),
               "seconds": run.seconds, "tokens_per_s": run.tokens_done / max(run.seconds, 1e-9),
               "eval_before": run.before[0] if run.before else None}
    if run.step < run.total_steps:  # stopped early on purpose: no final model
        run.metrics.close()
        return summary
    held = run.data.held_out is not None
    after = run.heldout() if held else run.heldout({k: v[:cfg.train.batch_size] for k, v in run.data.train.items()})
    if held:
        run.metrics.log(kind="eval", step=run.step, eval_loss=after[0], eval_ppl=after[1])
        summary["eval_after"] = after[0]
    check_learned(run, after)
    tok, gen_cfg = run.chat.tokenizer, run.generation_config
    final = ckpt.save_final(run.run_dir, run.model, tok, cfg.model.finetune, gen_cfg)  # every rank
    run.folder.finish()
    summary["final"] = str(final)
    if cfg.lora.save_merged and cfg.model.finetune != "full" and rank == 0:
        summary["merged"] = str(export_merged(run.model, cfg, final, run.run_dir / "merged", tok, gen_cfg))
    if cfg.export.gguf and rank == 0:  # one file for llama.cpp / Ollama, with the trained chat template
        from model.gguf import export_gguf
        source = Path(summary.get("merged", final))
        report = export_gguf(source, run.run_dir / f"{cfg.run.name}-{cfg.export.gguf}.gguf", cfg.export.gguf,
                             overwrite=True, template_jinja=tok.chat_template)
        summary["gguf"] = str(report.path)
        run.log(report.summary())
    if rank == 0:
        write_loss_svg(run.metrics.records, run.run_dir / "loss.svg")
    convs = run.data.held_out_conversations[:cfg.eval.sample_prompts]
    if D.world_size() > 1 and convs:
        run.log(f"sample generation is skipped under torchrun; try: {eval_command(cfg, final)}")
    elif convs:
        for text in sample_answers(run, convs):
            run.log("sample (held-out prompt, greedy):\n" + text)
    run.metrics.close()
    change = (f"; held-out loss {run.before[0]:.4f} -> {after[0]:.4f} (ppl {run.before[1]:.2f} -> "
              f"{after[1]:.2f})" if run.before and held else "")
    run.log(f"done: {run.step} steps, {run.tokens_done:,} trainable tokens in {run.seconds:.1f}s "
            f"({summary['tokens_per_s']:,.0f} tok/s){change}; model: {final}")
    return summary


def where_it_stopped(run: Run, stop: Interrupted) -> None:
    """Say on the stop line where the run was and what is on disk."""
    last = run.last_checkpoint
    stop.note = (f"at step {run.step} of {run.total_steps}; " +
                 (f"the last checkpoint, {last}, is intact: continue with run.resume=true" if last else
                  f"no checkpoint was saved (run.save_every=0?): {run.run_dir} is as it was before the run"))


def train(cfg: Config, stop_after: int | None = None) -> dict:
    """setup -> fit -> finish; `stop_after` ends early after that step (simulates a crash)."""
    with cpu_threads(cfg.run.threads):
        run = setup(cfg)
        with run.folder:  # a failure before the first save puts the folder back as it was
            try:
                fit(run, stop_after)
                return finish(run)
            except Interrupted as stop:
                where_it_stopped(run, stop)
                raise
