"""Data parallelism with FSDP2: N processes that together take the step one process would take.

Launch: `torchrun --nproc_per_node N train.py --config ...` (one machine) or, on every node,
`torchrun --nnodes M --node_rank i --nproc_per_node N --rdzv_backend c10d
--rdzv_endpoint HOST:29500 train.py ...`. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT in each process's environment; `init_distributed` reads them and opens the
process group: NCCL between GPUs, gloo between CPU processes. Without torchrun nothing is
initialised and every helper here degrades to the one-process case, so the loop has one code path.

What each process holds (FSDP2, `torch.distributed.fsdp.fully_shard`):
    every parameter of shape (d0, ...) is cut along dim 0 into N shards (a DTensor), so a rank
    keeps 1/N of the weights, gradients and AdamW moments. `fully_shard(block)` per transformer
    block makes the block one communication unit: just before the block runs its parameters
    are all-gathered (full weights exist for one block at a time), after it they are freed; in
    backward the block's gradients are reduce-scattered, each rank receiving the sum over ranks
    of its own shard's gradient, divided by N (FSDP averages). `fully_shard(model)` last takes
    what is left (embedding, final norm, output head). With mixed precision (bf16 runs) a
    `MixedPrecisionPolicy` keeps the sharded master weights in fp32 but all-gathers and computes
    in bf16, and reduces gradients in fp32 (the sum of N bf16 gradients would lose bits).
    Every forward is collective (all ranks all-gather together), so every rank must run the
    same number of them, evaluation included (`eval_batches`).

The one subtle thing is the loss scale. The step's gradient must be that of
    L = (sum over all ranks r, micro-batches m, trainable tokens t of ce_t) / n_global
where n_global counts the trainable tokens of the whole optimizer step on ALL ranks (PITFALLS:
averaging per micro-batch or per rank weights tokens unequally). Each rank only sees its own
loss sum S_r, and FSDP divides the summed gradient by N, so each rank back-propagates
    S_r * N / n_global    ->   after the reduce: (1/N) * sum_r grad(S_r) * N / n_global = grad L.
`global_token_count` is the one all_reduce(SUM) of the step's token count, done once per step
before the first backward; `loss_scale` returns N / n_global. The 2-process test checks the
result against one process at the same global batch.

Data: `step_rows` deals a deterministic stream of row indices (epoch e is a seeded permutation,
epochs concatenated), `rows_per_step` per optimizer step, so a step's rows depend only on
(seed, step) and not on the number of processes: the step's micro-batches are dealt
round-robin to the ranks, every rank gets the same count, and a resumed run (any N) starts
at its step number.

Checkpoints: `full_model_state_dict` / `full_optimizer_state_dict` all-gather the shards into
ordinary full tensors on rank 0's CPU (keyed by parameter name, never by position), so a state
saved by N processes loads into M processes, or into one process with no FSDP at all
(`load_optimizer_state`).

QLoRA: `model/nf4.py` keeps a 4-bit weight as BUFFERS (packed uint8 codes, scales stored as
bytes). FSDP2 shards parameters only, so those buffers stay whole on every rank (replicated, 4.13
bits/param), are never cast by the bf16 policy (a cast would corrupt the byte-coded scales), and
never take part in an all-gather; FSDP shards what is left: the LoRA adapters (trained) and the
norms/embedding/head (frozen). A float parameter inside a 4-bit module (a bias) is left out
too (`ignored_params`), so every tensor of a 4-bit layer lives in one place.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank in [0, world_size), GPU index on its node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Open the process group from torchrun's environment; one process: no group, rank 0.

    device: "cuda", "cpu" or "auto" (cuda when available). Each process takes GPU LOCAL_RANK.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if use_cuda:  # device_id binds NCCL's communicator to this GPU eagerly
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank, world, local_rank, dev)


def teardown(clean: bool = False) -> None:
    """Close the process group (a no-op in one process); call once, at the end of the run.

    After a clean finish every rank first waits for the others: destroying the group while a
    peer still has gloo work in flight aborts that process ("terminate called without an active
    exception"). No barrier on an error path: the other ranks may already be gone, and torchrun
    stops the whole group when one process fails.
    """
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# ---------------------------------------------------------------------------- sharding

def _four_bit_params(model: nn.Module) -> set[nn.Parameter]:
    """Parameters that belong to a 4-bit linear itself (its bias): kept out of FSDP.

    A 4-bit module is one that holds a non-floating tensor (packed NF4 codes) of its own, as a
    buffer or a parameter; its LoRA children (if any) stay managed by FSDP.
    """
    ignored: set[nn.Parameter] = set()
    for module in model.modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if any(not t.dtype.is_floating_point for t in own):
            ignored.update(module.parameters(recurse=False))
    return ignored


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per block: keep only each block's input, recompute the rest.

    Memory for activations drops from ~(tensors per block x layers) to ~(1 x layers + 1 block)
    at the price of a second forward of every block during backward (~+33% compute). The block's
    `forward` is swapped in place so parameter names (and checkpoints) do not change.
    """
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block.recompute = False  # the checkpoint keeps nothing inside the block: no recipes needed


def shard_model(model: nn.Module, mixed_precision: bool, activation_checkpointing: bool = False,
                compile: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 per transformer block, then at the root; returns the same module object.

    Order matters: checkpointing and compile wrap the block's forward first, so FSDP's
    all-gather hooks stay outside them (the recompute in backward sees unsharded weights).
    mixed_precision: compute in bf16 from fp32 shards, reduce gradients in fp32 (bf16 runs).
    Without a process group only checkpointing/compile are applied; a group of one process
    (bench/gpu_proof.py opens one to prove the FSDP path on a single GPU) is sharded too.
    """
    if activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        for block in model.layers:
            block.compile()  # in place: module names, hence state-dict keys, are unchanged
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision else MixedPrecisionPolicy())
    ignored = _four_bit_params(model) or None
    for block in model.layers:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored)
    # The root's parameters (embedding, final norm, head) are used again right after forward:
    # the chunked loss calls lm_head outside forward. Keep them gathered until backward.
    fully_shard(model, mp_policy=mp, reshard_after_forward=False, ignored_params=ignored)
    return model


# ---------------------------------------------------------------------------- data

def epoch_order(n_rows: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Row indices of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return list(range(n_rows))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=g).tolist()


def step_rows(n_rows: int, step: int, rows_per_step: int, seed: int,
              shuffle: bool = True) -> list[int]:
    """The global rows of optimizer step `step` (0-based), the same for any number of ranks.

    The stream is epoch 0's order, then epoch 1's, ...; step s takes stream positions
    [s * rows_per_step, (s+1) * rows_per_step), crossing an epoch boundary when it must, so no
    step is ever short and resuming needs only the step number.
    """
    if n_rows <= 0:
        raise ValueError("step_rows: the training set has no rows")
    start, stop = step * rows_per_step, (step + 1) * rows_per_step
    rows: list[int] = []
    epoch, pos = divmod(start, n_rows)
    while start + len(rows) < stop:
        order = epoch_order(n_rows, seed, epoch, shuffle)
        take = min(n_rows - pos, stop - start - len(rows))
        rows.extend(order[pos:pos + take])
        epoch, pos = epoch + 1, 0
    return rows


def rank_micro_batches(rows: list[int], micro_batch: int, rank: int = 0,
                       world: int = 1) -> list[list[int]]:
    """This rank's micro-batches of a step: the step's rows cut into micro-batches, dealt
    round-robin (micro-batch i goes to rank i % world).

    len(rows) must be world * micro_batch * k: every rank then runs k micro-batches of the same
    size, so no rank waits on another. A micro-batch holds the same rows whatever the world
    size, so N processes compute exactly the micro-batches one process would (only the order in
    which their gradients are summed differs).
    """
    if len(rows) % (world * micro_batch):
        raise ValueError(f"rank_micro_batches: {len(rows)} rows do not split into {world} ranks "
                         f"x micro-batches of {micro_batch}")
    micro = [rows[i:i + micro_batch] for i in range(0, len(rows), micro_batch)]
    return micro[rank::world]


def eval_batches(n_rows: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's held-out batches (row indices), dealt round-robin; every rank gets the SAME
    number of batches, a rank that runs out gets [] entries.

    Under FSDP every forward is collective (each block all-gathers its weights), so a rank
    that stopped early would leave the others waiting forever. The caller runs a forward for
    an empty entry too (on any row) and counts nothing from it.
    """
    starts = list(range(0, n_rows, batch_size))
    per_rank = -(-len(starts) // world)
    mine = [list(range(s, min(s + batch_size, n_rows))) for s in starts[rank::world]]
    return mine + [[] for _ in range(per_rank - len(mine))]


# ---------------------------------------------------------------------------- loss scale

def global_token_count(n_local: int, device: torch.device | str = "cpu") -> int:
    """Trainable tokens of this optimizer step summed over all ranks (one all_reduce)."""
    if not dist.is_initialized():
        return int(n_local)
    t = torch.tensor([n_local], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def loss_scale(n_global: int) -> float:
    """Multiply a rank's loss SUM by this before backward: world_size / n_global.

    FSDP averages gradients over ranks; the factor world_size undoes that average, so the
    reduced gradient is that of (sum of every rank's token losses) / n_global.
    """
    return world_size() / max(int(n_global), 1)


def all_reduce_sum(value: float, device: torch.device | str = "cpu") -> float:
    """Sum a Python number over ranks (for logging the step's global loss sum)."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global gradient norm (over all shards of all ranks); returns it as a float.

    With FSDP the gradients are DTensor shards; torch's clip computes their global norm with
    one all-reduce and returns it as a replicated DTensor, read back with `full_tensor`.
    max_norm <= 0 only measures.
    """
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------------------- checkpoints

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kw)


def full_model_state_dict(model: nn.Module, trainable_only: bool = False) -> dict:
    """Full, unsharded CPU tensors by parameter name, on rank 0 (other ranks get {}).

    trainable_only: gather just the trainable tensors (LoRA adapters), which skips
    all-gathering the frozen base - the slow part of saving QLoRA under FSDP.
    Every rank must call it (the gather is collective).
    """
    if not dist.is_initialized():
        sd = model.state_dict()
        if trainable_only:
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            sd = {k: v for k, v in sd.items() if k in keep}
        return {k: v.detach().cpu() for k, v in sd.items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with full tensors keyed by parameter NAME, on rank 0 ({} elsewhere).

    Name keys (instead of torch's positional ids) make it loadable by any number of processes.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer,
                                    options=_options(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state saved by `full_optimizer_state_dict` (any world size) into this run.

    Every rank passes the full state it read from disk; each keeps its own shard.
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=_options(full_state_dict=True))
