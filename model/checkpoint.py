"""Hugging Face checkpoint folder <-> our Transformer.

An HF folder (Llama, Qwen2, Qwen3 or Mistral: model/config.py) holds `config.json` (the shape), weights (`model.safetensors`, or shards plus
`model.safetensors.index.json`, or the older pickled `pytorch_model.bin`), `generation_config.json`
(stop ids) and the tokenizer files. Weight names are ours with a "model." prefix
(`model.layers.0.self_attn.q_proj.weight`), except `lm_head.weight`.

Why build on the meta device: `Transformer(config)` on the CPU would allocate and randomly
initialise every weight, and then loading would allocate a second copy: 2x the model in memory,
plus the time to initialise weights we throw away. On the meta device a module has shapes and
dtypes but no storage. We then read the file tensor by tensor (memory-mapped, so nothing is read
until it is needed), copy each into a tensor of the requested dtype/device a 1 MB slice at a
time (dropping the file pages of each slice once copied), and put it in place of its meta
parameter. Peak memory stays at one copy of the weights in the final dtype, plus one slice.

`linear_hook(name, weight) -> nn.Module | None` is the QLoRA seam: it sees each nn.Linear weight
(converted to dtype, on device) as it is read, and may return a module (e.g. a 4-bit Linear) to
put in that linear's place, so a full-precision copy of the whole model never exists.

Every weight is checked once as it is read: a NaN or Inf in a checkpoint would otherwise "train"
into a NaN model with every step skipped; the message names the tensor. A biased projection's
bias is read after its weight, so a 4-bit replacement made from the weight receives it too. A
tied head (`tie_word_embeddings`) is the embedding: a stray `lm_head.weight` in the file is
skipped when loading (as transformers does) and never written when saving. Qwen's vocabulary is
padded (151936 embedding rows for 151665 tokenizer ids); the rows stay as they are.

Saving writes everything into a temporary sibling folder and renames it into place only when
complete, so an interrupted save never leaves a half-written checkpoint where a good one was.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from model.errors import SFTError
from model.files import atomic_write_json, read_json, write_folder
from model.llama import Config, Transformer
from model.safetensors import open_sharded, save_sharded
from model.untrained import untrained_rows

LinearHook = Callable[[str, torch.Tensor], "nn.Module | None"]
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints stored this recomputable buffer


def read_config(folder: str | os.PathLike) -> Config:
    """The folder's config.json, every key checked (model/config.py); remembers the folder."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.exists():
        raise SFTError(f"{path}: missing (is {folder} a Hugging Face model folder?)")
    cfg = Config.from_hf(read_json(path, "config.json"), source=str(path))
    cfg.name_or_path = str(folder)
    return cfg


def check_vocab(cfg: Config, tokenizer, source: str) -> None:
    """The tokenizer's ids must all index the embedding (more rows than ids is fine: Qwen pads)."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SFTError(f"{source}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                       f"{tokenizer.vocab_size} ids (id {tokenizer.vocab_size - 1} would index past the "
                       "embedding); use the tokenizer that belongs to this model")


def _open_weights(folder: Path) -> dict[str, tuple[str, Callable[[], torch.Tensor], Callable[[int, int], None]]]:
    """HF name -> (file it comes from, read(), release(lo, hi)) for every tensor of the folder."""
    if (folder / "model.safetensors.index.json").exists() or (folder / "model.safetensors").exists():
        return {name: (str(f.path), lambda f=f, k=key: f.get_tensor(k),
                       lambda lo, hi, f=f, k=key: f.release(k, lo, hi))
                for name, (f, key) in open_sharded(folder).items()}
    bins = []
    if (folder / "pytorch_model.bin.index.json").exists():
        try:
            index = read_json(folder / "pytorch_model.bin.index.json", "weights index")
            bins = sorted(set(index["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as e:
            raise SFTError(f"{folder / 'pytorch_model.bin.index.json'}: not a valid index ({e})") from None
    elif (folder / "pytorch_model.bin").exists():
        bins = ["pytorch_model.bin"]
    if not bins:
        raise SFTError(f"{folder}: no weights (model.safetensors[.index.json] or pytorch_model.bin)")
    out = {}
    for fname in bins:
        sd = _torch_load(folder / fname)
        out.update({k: (str(folder / fname), lambda t=t: t, lambda lo, hi: None) for k, t in sd.items()})
    return out


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, with weights_only=True: an arbitrary pickle could run code.
    mmap (lazy reads) needs the zip format of torch >= 1.6; older files are read whole."""
    if not path.exists():
        raise SFTError(f"{path}: missing (listed in pytorch_model.bin.index.json)")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message is a page long: keep the line that says why
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "GLOBAL" in line), lines[0])
        raise SFTError(f"{path}: cannot load with torch.load(weights_only=True): {why}") from None


def _copy_in_slices(src: torch.Tensor, dst: torch.Tensor, release: Callable[[int, int], None],
                    what: str, slice_bytes: int = 1 << 20) -> None:
    """dst[:] = src (converting dtype/device) a few MB at a time, dropping each slice's file
    pages once copied: the extra memory while loading is one slice, not one whole tensor.
    Each slice is checked for NaN/Inf as it lands (a value too large for a bf16/fp16 `dst`
    becomes Inf there and is caught too); the check's temporary is one slice as well."""
    s, d = src.reshape(-1), dst.view(-1)
    size, step = src.element_size(), max(1, slice_bytes // src.element_size())
    for i in range(0, s.numel(), step):
        j = min(i + step, s.numel())
        d[i:j].copy_(s[i:j])
        if not bool(torch.isfinite(d[i:j].abs().amax())):  # max propagates NaN (and isfinite is slow)
            raise SFTError(f"{what} holds NaN or Inf values; the checkpoint is damaged (re-download "
                           "or re-export it)")
        release(i * size, j * size)


def _weight_before_bias(hf_name: str) -> tuple[str, bool]:
    """Sort key: a module's weight just before its bias (the hook builds the module from the weight)."""
    module, _, attr = hf_name.rpartition(".")
    return module, attr == "bias"


def _our_name(hf_name: str) -> str:
    return hf_name if hf_name == "lm_head.weight" else hf_name.removeprefix("model.")


def load_pretrained(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu",
                    linear_hook: LinearHook | None = None) -> Transformer:
    """Load an HF folder (any family of model/config.py) into a Transformer of `dtype` on
    `device` (eval mode).

    linear_hook(module_name, weight): called for each nn.Linear weight ("layers.0.mlp.up_proj",
    "lm_head" unless tied) after conversion; return a module to replace that nn.Linear, or None
    to keep a plain nn.Linear holding `weight`.
    """
    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {n: p for n, p in model.named_parameters()}  # tied lm_head shares embed's entry
    loaded: set[str] = set()
    weights = _open_weights(folder)
    for hf_name in sorted(weights, key=_weight_before_bias):
        fname, read, release = weights[hf_name]
        name = _our_name(hf_name)
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if name in loaded:
            raise SFTError(f"{fname}: tensor {hf_name!r} appears in two weight files")
        if name not in expected:
            raise SFTError(f"{fname}: unexpected tensor {hf_name!r} for a {cfg.model_type} model "
                           f"as {folder / 'config.json'} describes it")
        src = read()
        if tuple(src.shape) != tuple(expected[name].shape):
            raise SFTError(f"{fname}: tensor {hf_name!r} has shape {tuple(src.shape)} but "
                           f"{folder / 'config.json'} implies {tuple(expected[name].shape)}")
        if not src.is_floating_point():
            raise SFTError(f"{fname}: tensor {hf_name!r} has dtype {src.dtype}; model weights are "
                           "floating point (F32, F16 or BF16)")
        t = torch.empty(src.shape, device=device, dtype=dtype)
        _copy_in_slices(src, t, release, f"{fname}: tensor {hf_name!r}")
        del src
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name)  # a 4-bit replacement once its weight was read
        hooked = linear_hook is not None and attr == "weight" and isinstance(module, nn.Linear)
        replacement = linear_hook(mod_name, t) if hooked else None
        if replacement is not None:
            parent, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent), child, replacement)
        else:
            setattr(module, attr, nn.Parameter(t, requires_grad=t.is_floating_point()))
        del expected[name]
        loaded.add(name)
    if expected:
        raise SFTError(f"{folder}: weights missing from the checkpoint: {sorted(expected)[:5]}"
                       + (f" and {len(expected) - 5} more" if len(expected) > 5 else ""))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def folder_untrained_rows(folder: str | os.PathLike, token_ids) -> list[int]:
    """model/untrained.py's test on a folder without building the model: only the embedding (and
    an untied head) are read, memory-mapped (data.inspect uses it)."""
    folder = Path(folder)
    cfg = read_config(folder)
    weights = _open_weights(folder)
    if "model.embed_tokens.weight" not in weights:
        raise SFTError(f"{folder}: no model.embed_tokens.weight in the weights")
    head = None if cfg.tie_word_embeddings or "lm_head.weight" not in weights else weights["lm_head.weight"][1]()
    return untrained_rows(weights["model.embed_tokens.weight"][1](), token_ids, head)


def hf_state_dict(model: Transformer, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Our parameters under HF names (tied lm_head left out, as HF does).

    state_dict: the tensors to use instead of model.state_dict(), e.g. the full tensors
    gathered from FSDP shards (training/distributed.py), whose own state_dict() holds shards.
    """
    out = {}
    for name, t in (model.state_dict() if state_dict is None else state_dict).items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[name if name == "lm_head.weight" else "model." + name] = t
    return out


def _check_plain(model: Transformer, sd: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        ref = Transformer(model.config)
    want = set(hf_state_dict(ref))
    if set(sd) != want:
        extra = sorted(set(sd) - want)[:3]
        raise SFTError(f"save_pretrained: model has weights a plain model lacks {extra} (merge LoRA / "
                       "dequantize before saving a full checkpoint, or save an adapter)")


def save_pretrained(model: Transformer, folder: str | os.PathLike, tokenizer=None,
                    max_shard_bytes: int = 5 * 1024**3, generation_config: dict | None = None,
                    state_dict: dict | None = None) -> None:
    """Write an HF folder: config.json, generation_config.json, safetensors (sharded above
    max_shard_bytes) and, if given, the tokenizer. The folder is replaced only when complete.

    generation_config: extra keys; its "eos_token_id" (int or list) is merged with the config's
    eos ids so that every stop id used in training is written.
    state_dict: full tensors to write in place of model.state_dict() (see hf_state_dict), or
    model.safetensors.LazyTensors made one at a time as they are written (lora.save_merged).
    """
    folder = Path(folder)
    sd = hf_state_dict(model, state_dict)
    _check_plain(model, sd)
    with write_folder(folder) as tmp:
        cfg = model.config.to_hf()
        dtype = next(iter(sd.values())).dtype
        cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")  # 4.x / 5.x key
        atomic_write_json(tmp / "config.json", cfg)
        gen = dict(generation_config or {})
        eos = model.config.eos_ids
        extra = gen.get("eos_token_id", [])
        eos += [e for e in ([extra] if isinstance(extra, int) else extra) if e not in eos]
        gen.update(bos_token_id=model.config.bos_token_id,
                   eos_token_id=(eos[0] if len(eos) == 1 else eos) or None)
        if model.config.pad_token_id is not None:
            gen.setdefault("pad_token_id", model.config.pad_token_id)
        atomic_write_json(tmp / "generation_config.json", gen)
        save_sharded(sd, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
