"""LoRA: train a low-rank update next to each frozen weight, and save it in PEFT's layout.

The idea
--------
Fine-tuning changes a pretrained weight W (out, in) by some dW. LoRA bets that dW has low rank
and writes it as dW = B @ A with A (r, in) and B (out, r), r << in, out. The layer computes

    y = x W^T + scaling * (dropout(x) A^T) B^T,      scaling = alpha / r   (rsLoRA: alpha / sqrt(r))

W stays frozen; only A and B train: r * (in + out) numbers instead of in * out (for a 4096 x 4096
projection at r = 8: 65k instead of 16.8M, 0.4%). The optimizer state shrinks by the same factor,
and the frozen W needs no gradient of its own, only the gradient that flows through it to x.

Initialisation makes the first step start exactly at the pretrained model: B = 0, so dW = 0,
while A gets PEFT's (and nn.Linear's) Kaiming-uniform init with a = sqrt(5), so B's gradient
(which is proportional to A x) is not zero either. alpha / r keeps the update's size roughly
independent of r when you change r; rsLoRA's alpha / sqrt(r) keeps it stable for large r.

After training, B @ A * scaling can be *merged* into W, giving a plain nn.Linear that costs
nothing extra at inference; `unmerge` subtracts it again. With QLoRA the frozen W is a 4-bit
`model.nf4.Linear4bit`: merging dequantizes it (rounding the sum back to 4 bits would throw the
update away) and yields a full-precision nn.Linear, one layer at a time.

Exporting the merged model does not merge in memory. `merge_lora` leaves every merged layer in
full precision, so for a 7B QLoRA model the whole bf16 model (13.5 GB) would exist at once
before `save_pretrained` wrote it. `save_merged(model, folder)` instead hands the writer one
`LazyTensor` per weight (model/safetensors.py): the header is laid out from shapes alone, then
each weight is dequantized, has scaling * B @ A added, is written and is dropped before the next
is made. The model itself is left unchanged (still 4-bit, still trainable), and the extra memory
is about one weight matrix. Weights that need no merging are written straight from the model.

The adapter on disk is PEFT's: `adapter_config.json` and `adapter_model.safetensors` whose tensor
names are the Hugging Face module names under the "base_model.model." prefix, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (A: (r, in), B: (out, r)), with
no adapter name in the key. Our module tree is HF's minus the leading "model.", and our LoRA
layer names its parts base_layer / lora_A / lora_B like PEFT, so a name maps by a prefix.
A projection with a bias (Qwen2's q/k/v) keeps it in the base layer: the adapter adds to the
weight only (PEFT's `bias: "none"`), so merging adds B @ A to W and leaves the bias as it was.

The adapter's metadata is the adapter's own: `adapter_config(model)` reads it off the LoRA layers
(rank, alpha, dropout, targets; what else trains in full is what requires a gradient), and
`AdapterConfig` is the typed form of `adapter_config.json`. It records the base model's folder
(`base_model_name_or_path`, from the config the base was loaded with), so a tool handed only the
adapter can say which base it needs. Reading an adapter_config.json checks every key: PEFT
features that change the math and that we do not implement (DoRA, LoRA biases, per-layer ranks,
layer selection, ...) are refused by name, never ignored.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import save_pretrained
from model.errors import SFTError
from model.files import atomic_write_json, read_json, write_folder
from model.llama import Transformer
from model.nf4 import Linear4bit
from model.options import check_value, opt
from model.safetensors import LazyTensor, load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class _UpcastLinear(torch.autograd.Function):
    """x.to(w.dtype) @ w.T (the first LoRA product of a bf16 or 4-bit model), keeping x for the
    weight gradient in its own dtype. Left to autograd, the fp32 copy of x is what is kept: twice
    the bytes of x, and once per projection although q, k and v (and gate and up) read one x,
    which then also escapes the block's recomputation (model/recompute.py): 1.2 GiB of an
    8B-shaped QLoRA step at 256 tokens. Backward makes the copy again; the values are the same."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)
        ctx.x_dtype = x.dtype
        return F.linear(x.to(w.dtype), w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        dx = (g @ w).to(ctx.x_dtype) if w is not None else None              # (..., in)
        dw = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)
              if x is not None else None)                                    # (r, in)
        return dx, dw


class LoRALinear(nn.Module):
    """base_layer(x) + scaling * lora_B(lora_A(dropout(x))); base_layer is nn.Linear or Linear4bit."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if r <= 0:
            raise SFTError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = _device_of(base_layer)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self._quantized: list[Linear4bit] = []  # the 4-bit base while merged (not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # the adapter runs in its own dtype (fp32 by default, as PEFT), the sum in the base's
        w = self.lora_A.weight
        if x.dtype != w.dtype and isinstance(self.lora_dropout, nn.Identity) \
                and not torch.is_autocast_enabled(x.device.type):
            a = _UpcastLinear.apply(x, w)  # keeps the bf16 x for backward, not its fp32 copy
        else:
            a = self.lora_A(self.lora_dropout(x.to(w.dtype)))
        return (result + self.lora_B(a) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in) in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the merged weight: the base's (a 4-bit base's compute dtype)."""
        base = self.base_layer
        return base.compute_dtype if isinstance(base, Linear4bit) else base.weight.dtype

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A, (out, in) in `weight_dtype`, summed in fp32 and rounded once.

        A fresh tensor (a 4-bit base is dequantized for it); the layer is left as it is.
        If the layer is already merged, that is its base weight.
        """
        base = self.base_layer
        if self.merged:
            return base.weight.detach()
        w = base.dequantize() if isinstance(base, Linear4bit) else base.weight.detach()
        return (w.float() + self.delta_weight()).to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (a 4-bit base becomes a dequantized nn.Linear)."""
        if self.merged:
            return
        w = self.merged_weight()
        if isinstance(self.base_layer, Linear4bit):
            self._quantized = [self.base_layer]
            self.base_layer = self.base_layer.to_linear(w.dtype)
            self.base_layer.weight.requires_grad_(False)
        self.base_layer.weight.copy_(w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (a 4-bit base gets its original codes back, untouched)."""
        if not self.merged:
            return
        if self._quantized:
            self.base_layer, self._quantized = self._quantized[0], []
        else:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _device_of(module: nn.Module) -> torch.device:
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers())
    return t.device


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit))


def hf_name(name: str) -> str:
    """Our module name -> HF's: everything but lm_head lives under "model."."""
    return name if name.split(".")[0] == "lm_head" else "model." + name


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a string is a regex over the full module name ("all-linear": every linear
    except the head); a list matches a name equal to an entry or ending in "." + entry."""
    if targets == "all-linear" or list(targets) == ["all-linear"]:     # a config may give a list
        return name.split(".")[-1] != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None or re.fullmatch(targets, hf_name(name)) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=("q_proj", "v_proj"), use_rslora: bool = False,
               train_embeddings: bool = False, train_head: bool = False,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap every targeted linear in a LoRALinear (in place) and freeze everything else.

    targets: module names such as ("q_proj", "v_proj"), "all-linear", or a regex string.
    train_embeddings / train_head also train embed_tokens / lm_head in full (PEFT's
    modules_to_save). LoRA weights are created in `dtype` (fp32 by default, like PEFT).
    """
    if lora_layers(model):
        raise SFTError("apply_lora: the model already has LoRA layers (merge_lora first, or "
                       "load_adapter into the same model)")
    modules = dict(model.named_modules())
    chosen = [n for n, m in modules.items() if _is_linear(m) and _matches(n, targets)]
    if not chosen:
        names = sorted({n.split(".")[-1] for n, m in modules.items() if _is_linear(m)})
        raise SFTError(f"apply_lora: targets {targets!r} match no linear layer; this model has {names}")
    for name in chosen:
        parent, _, child = name.rpartition(".")
        holder = modules[parent] if parent else model
        setattr(holder, child, LoRALinear(modules[name], r, alpha, dropout, use_rslora, dtype))
    mark_only_lora_trainable(model, train_embeddings, train_head)
    return model


def mark_only_lora_trainable(model: nn.Module, train_embeddings: bool = False, train_head: bool = False) -> None:
    """requires_grad only for lora_A / lora_B (and optionally the embedding / head weights)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        leaf = name.split(".")
        if "lora_A" in leaf or "lora_B" in leaf:
            p.requires_grad_(True)
    if train_embeddings and hasattr(model, "embed_tokens"):
        model.embed_tokens.weight.requires_grad_(True)
    if train_head and hasattr(model, "lm_head"):   # a tied head shares the embedding's tensor
        model.lm_head.weight.requires_grad_(True)


# ----------------------------------------------------------------------------- adapter_config.json

@dataclass
class AdapterConfig:
    """adapter_config.json, typed: PEFT's keys for the LoRA features we implement."""
    r: int = opt(8, "LoRA rank", gt=0)
    lora_alpha: float = opt(16.0, "scale numerator: the update is scaled by alpha / r", gt=0)
    lora_dropout: float = opt(0.0, "dropout on the LoRA input", ge=0, lt=1)
    use_rslora: bool = opt(False, "scale by alpha / sqrt(r)")
    target_modules: list[str] | str = opt([], "module names (or one regex) that have adapters")
    modules_to_save: list[str] | None = None  # trained in full: embed_tokens and/or lm_head
    base_model_name_or_path: str | None = None  # the folder of the base model

    def to_peft(self) -> dict:
        """The JSON PEFT writes (its other keys at their off values), which PEFT loads as is."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", **asdict(self), "bias": "none",
                "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
                "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
                "rank_pattern": {}, "alpha_pattern": {}}


# keys whose value changes nothing once the weights exist (bookkeeping, initialisation schemes)
ADAPTER_NEUTRAL = {"peft_type", "task_type", "auto_mapping", "peft_version", "revision", "inference_mode",
                   "init_lora_weights", "layers_pattern", "megatron_core", "loftq_config", "eva_config",
                   "corda_config", "lora_ga_config", "qalora_group_size"}
ADAPTER_OFF = {"bias": "none"}  # a switch we implement only off; any other unknown key must be empty
FULL_MODULES = ("embed_tokens", "lm_head")


def _empty(value) -> bool:
    return value is None or value is False or value == {} or value == []


def read_adapter_config(folder: str | os.PathLike) -> AdapterConfig:
    """adapter_config.json, every key checked: ours typed, PEFT's bookkeeping accepted, any other
    PEFT feature accepted only when off (null, false, {} or []) and refused by name otherwise."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():
        raise SFTError(f"{path}: missing (is {folder} a PEFT/LoRA adapter folder?)")
    raw = read_json(path, ADAPTER_CONFIG)
    if not isinstance(raw, dict):
        raise SFTError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise SFTError(f"{path}: missing key {key!r}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise SFTError(f"{path}: peft_type {raw['peft_type']!r} is not supported (only LORA)")
    known = {f.name: f for f in fields(AdapterConfig)}
    cfg = AdapterConfig()
    for key, value in raw.items():
        if key in known:
            setattr(cfg, key, _adapter_field(value, key, known[key], str(path)))
        elif key in ADAPTER_OFF and value != ADAPTER_OFF[key] or not (
                key in ADAPTER_OFF or key in ADAPTER_NEUTRAL or _empty(value)):
            raise SFTError(f"{path}: {key}={value!r} is not supported (plain LoRA only: bias none, one "
                           "rank and alpha for all layers, no DoRA); a setting that changes the math is "
                           "refused, never ignored")
    return cfg


def _adapter_field(value, key: str, f, source: str):
    """One AdapterConfig key checked (model/options.py check_value for the plain types)."""
    if key == "target_modules":
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return value
        raise SFTError(f"{source}: 'target_modules' must be a regex string or a list of module names, got {value!r}")
    if key == "modules_to_save":
        if value is None or (isinstance(value, list) and set(value) <= set(FULL_MODULES)):
            return value or None
        raise SFTError(f"{source}: 'modules_to_save' {value!r}: only {' and '.join(FULL_MODULES)} can be "
                       "trained in full")
    if key == "base_model_name_or_path":
        if value is None or isinstance(value, str):
            return value
        raise SFTError(f"{source}: 'base_model_name_or_path' must be a string or null, got {value!r}")
    return check_value(value, {"r": int, "use_rslora": bool}.get(key, float), f, key, source)


def adapter_config(model: nn.Module) -> AdapterConfig:
    """The adapter's metadata, read off its LoRA layers (apply_lora gives them all one shape)."""
    layers = lora_layers(model)
    if not layers:
        raise SFTError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    trained = [m for m in FULL_MODULES  # a LoRA-wrapped head has no .weight; a tied one is the embedding
               if getattr(getattr(model, m, None), "weight", None) is not None
               and getattr(model, m).weight.requires_grad and not (m == "lm_head" and tied)]
    return AdapterConfig(first.r, first.alpha, dropout, first.use_rslora,
                         sorted({n.split(".")[-1] for n in layers}), trained or None,
                         getattr(config, "name_or_path", None))


def _adapter_tensors(model: nn.Module, modules_to_save: list[str] | None,
                     state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Everything the adapter file holds, under PEFT's names.

    state_dict: take the tensors from it (our names) instead of the modules, e.g. full tensors
    gathered from FSDP shards by training/distributed.py.
    """
    def tensor(name: str) -> torch.Tensor:
        if state_dict is not None:
            return state_dict[name]
        return model.get_parameter(name).detach()
    out = {}
    for name in lora_layers(model):
        for part in ("lora_A", "lora_B"):
            out[f"{PEFT_PREFIX}{hf_name(name)}.{part}.weight"] = tensor(f"{name}.{part}.weight")
    for mod in modules_to_save or []:
        out[f"{PEFT_PREFIX}{hf_name(mod)}.weight"] = tensor(f"{mod}.weight")
    return out


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None,
                 state_dict: dict | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout); atomic folder swap.

    base_model_name_or_path: default, the folder the base model was loaded from.
    state_dict: full adapter tensors by our parameter names, when the model's own are FSDP shards.
    """
    cfg = adapter_config(model)
    if any(layer.merged for layer in lora_layers(model).values()):
        raise SFTError("save_adapter: LoRA layers are merged; unmerge them before saving the adapter")
    if base_model_name_or_path is not None:
        cfg.base_model_name_or_path = base_model_name_or_path
    tensors = _adapter_tensors(model, cfg.modules_to_save, state_dict)
    with write_folder(folder) as tmp:
        atomic_write_json(tmp / ADAPTER_CONFIG, cfg.to_peft())
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp / ADAPTER_WEIGHTS)


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Apply the LoRA described by `folder` (PEFT's or ours) to `model` and load its weights."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.exists():
        raise SFTError(f"{weights_path}: missing (only safetensors adapters are read; re-save with "
                       "PEFT's save_pretrained(safe_serialization=True))")
    targets = cfg.target_modules
    to_save = cfg.modules_to_save or []
    if not lora_layers(model):
        apply_lora(model, r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   targets=targets if isinstance(targets, str) else tuple(targets),
                   use_rslora=cfg.use_rslora, train_embeddings="embed_tokens" in to_save,
                   train_head="lm_head" in to_save)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {f"{PEFT_PREFIX}{hf_name(n)}": n for n in params
                if ".lora_A." in n or ".lora_B." in n or n.split(".")[0] in to_save}
    tensors = load_file(weights_path)
    loaded: set[int] = set()          # ids of filled tensors: a tied head and embedding are one
    for key, t in tensors.items():
        key = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)          # older PEFT kept the adapter name
        if key not in expected:
            raise SFTError(f"{weights_path}: tensor {key!r} has no place in this model "
                           f"(adapter made for another architecture or target_modules?)")
        p = params[expected.pop(key)]
        if p.shape != t.shape:
            raise SFTError(f"{weights_path}: tensor {key!r} has shape {tuple(t.shape)}, the model "
                           f"expects {tuple(p.shape)} (different base model or rank?)")
        with torch.no_grad():
            p.copy_(t)
        loaded.add(id(p))
    missing = [k for k, n in expected.items() if id(params[n]) not in loaded]
    if missing:
        raise SFTError(f"{weights_path}: missing {len(missing)} adapter tensors, e.g. {missing[0]!r}")
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + scaling * B @ A (in place).

    A 4-bit base is dequantized layer by layer into its compute dtype, so the peak is the merged
    model plus one layer. To write a full HF checkpoint, prefer `save_merged`, which never holds
    the merged model in memory (and leaves `model` as it is).
    """
    modules = dict(model.named_modules())
    for name, layer in lora_layers(model).items():
        layer.merge()
        merged = layer.base_layer
        merged.weight.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, merged)
        layer._quantized = []      # drop the 4-bit copy now, not after the whole model
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor | LazyTensor]:
    """The weights of the merged model under our names, in the order of a plain Transformer.

    LoRA layers and bare 4-bit layers (QLoRA quantizes every linear, LoRA may target only some)
    become LazyTensors that merge / dequantize when the writer asks; other weights are the
    model's own tensors.
    """
    with torch.device("meta"):
        ref = Transformer(model.config)          # the plain model's names and shapes, no storage
    modules = dict(model.named_modules())
    if model.config.tie_word_embeddings and isinstance(modules.get("lm_head"), LoRALinear):
        raise SFTError("save_merged: LoRA on a head tied to the embedding cannot be merged into a "
                       "tied checkpoint (untie the head, or do not target lm_head)")
    out: dict[str, torch.Tensor | LazyTensor] = {}
    for name, meta in ref.state_dict().items():
        mod_name, _, attr = name.rpartition(".")
        module, shape = modules[mod_name], tuple(meta.shape)
        if isinstance(module, LoRALinear) and attr == "bias":  # the update is on the weight only
            module = module.base_layer
        if isinstance(module, LoRALinear):
            out[name] = LazyTensor(shape, module.weight_dtype, module.merged_weight)
        elif isinstance(module, Linear4bit) and attr == "weight":
            out[name] = LazyTensor(shape, module.compute_dtype, module.dequantize)
        elif isinstance(module, Linear4bit):  # its bias, kept in the compute dtype
            out[name] = module.bias.detach().to(module.compute_dtype)
        else:
            out[name] = getattr(module, attr).detach()
    return out


def save_merged(model: nn.Module, folder: str | os.PathLike, tokenizer=None,
                max_shard_bytes: int = 5 * 1024**3, generation_config: dict | None = None) -> None:
    """Write `model` with its LoRA updates merged (and 4-bit weights dequantized) as a full HF
    checkpoint that load_pretrained reads, streaming one weight at a time; `model` is unchanged.

    This is the one way to save a LoRA/QLoRA model as a full model: save_pretrained alone
    refuses a model that still holds LoRA or 4-bit layers. Arguments as save_pretrained's.
    For llama.cpp / Ollama, `model.gguf.export_gguf(folder, ...)` then writes the merged folder
    as one GGUF file (the training run does it with export.gguf).
    """
    save_pretrained(model, folder, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes,
                    generation_config=generation_config, state_dict=merged_state_dict(model))

