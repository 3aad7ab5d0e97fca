"""config.json <-> Config: which model families load, and every key checked where it enters.

A Hugging Face `config.json` names a family (`model_type`, and the class transformers builds in
`architectures`) and the numbers of its shape. The four families we build differ from plain
Llama by a few flags on the same modules (model/llama.py), never by a subclass:

    model_type  architectures        q/k/v bias  q/k RMSNorm  sliding window   typical checkpoints
    llama       LlamaForCausalLM     -           -            -                Llama-2/3.x, SmolLM2,
                                                                               R1-Distill-Llama
    qwen2       Qwen2ForCausalLM     yes         -            -  (refused)     Qwen2.5, R1-Distill-Qwen
    qwen3       Qwen3ForCausalLM     -           yes          -  (refused)     Qwen3 (dense)
    mistral     MistralForCausalLM   -           -            sliding_window   Mistral-7B v0.1-v0.3

Every family also reads: vocab/hidden/intermediate sizes, layer and head counts, an explicit
`head_dim` (Qwen3: heads x head_dim != hidden), `rms_norm_eps`, RoPE (`rope_theta`, and scaling
`linear` or `llama3`, written either as transformers 4.x `rope_scaling` or 5.x
`rope_parameters`), `tie_word_embeddings`, token ids (`eos_token_id` may be a list: Llama-3
lists three).

Refuse, never ignore. A key that could change the model's math and that we do not implement
would otherwise load *silently* as a different model (a Mistral read as Llama differs past the
window; a yarn-scaled Qwen differs past its original context). So keys are checked against an
allow-list per family: a key the family's math reads (above), a key that changes nothing we
compute (`NEUTRAL_KEYS`: initializer_range, use_cache, dtype, ...), or a switch accepted only in
its off position (`OFF_KEYS`: attention_bias false, mlp_bias false, pretraining_tp 1,
use_sliding_window false, ...; a known feature key written as null is off too). Anything
else -- an unknown `model_type`, MoE keys, soft-capping, yarn/dynamic/longrope RoPE,
`use_sliding_window: true`, custom code (`auto_map`), a pre-quantized checkpoint
(`quantization_config`) -- is an SFTError naming the file and the key.

Types are checked too (model/options.py `check_value`, the one checker every tool uses): sizes are
positive ints, eps and theta finite positive floats, booleans real JSON booleans (the string
"false" is truthy in Python, so `tie_word_embeddings: "false"` is an error, not a tied model).
A key missing from the file takes transformers' default for that family (Mistral without
`sliding_window` has a 4096 window; Qwen3 without `head_dim` has 128), so both read a file alike.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from model.errors import SFTError
from model.options import check_value, opt

ModelType = Literal["llama", "qwen2", "qwen3", "mistral"]


@dataclass(frozen=True)
class Family:
    architecture: str        # the class transformers builds for it
    attention_bias: bool     # biases on q_proj, k_proj, v_proj (never on o_proj)
    qk_norm: bool            # RMSNorm over each head's q and k, before RoPE
    keys: frozenset[str]     # config.json keys of its own (beyond SHAPE_KEYS)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", False, False, frozenset()),
    "qwen2": Family("Qwen2ForCausalLM", True, False, frozenset()),
    "qwen3": Family("Qwen3ForCausalLM", False, True, frozenset()),
    "mistral": Family("MistralForCausalLM", False, False, frozenset({"sliding_window"})),
}
ARCHITECTURES = {f.architecture: name for name, f in FAMILIES.items()}

SHAPE_KEYS = frozenset({
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"})
NEUTRAL_KEYS = frozenset({   # never change what the model computes
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "tokenizer_class", "is_llama_config", "max_sequence_length", "max_length", "do_sample", "temperature", "top_k",
    "top_p", "num_beams", "repetition_penalty", "length_penalty"})
# switches accepted only in their off position: {family or "*": {key: the value meaning off}}
OFF_KEYS: dict[str, dict[str, Any]] = {
    "*": {"attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1},
    "llama": {"attention_bias": False, "rope_interleaved": False},  # SmolLM2 writes the latter
    "qwen2": {"attention_bias": True, "use_sliding_window": False},  # qwen2 always has q/k/v biases
    "qwen3": {"attention_bias": False, "use_sliding_window": False},
    "mistral": {"attention_bias": False},
}
IGNORED_WHEN_OFF = {"qwen2": {"sliding_window", "max_window_layers", "layer_types"},
                    "qwen3": {"sliding_window", "max_window_layers", "layer_types"}}
WHY = {"num_experts": "mixture of experts", "num_local_experts": "mixture of experts",
       "num_experts_per_tok": "mixture of experts", "moe_intermediate_size": "mixture of experts",
       "final_logit_softcapping": "logit soft-capping", "attn_logit_softcapping": "logit soft-capping",
       "quantization_config": "a pre-quantized checkpoint", "auto_map": "custom modeling code",
       "partial_rotary_factor": "RoPE on part of each head", "sliding_window": "sliding-window attention",
       "mlp_bias": "MLP biases", "attention_bias": "attention biases (q/k/v/o)",
       "pretraining_tp": "split matmuls", "use_sliding_window": "sliding-window attention",
       "attention_dropout": "attention dropout", "rope_interleaved": "RoPE on adjacent pairs"}
ROPE_TYPES = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
DEFAULT_HEAD_DIM = {"qwen3": 128}           # transformers' defaults where a family has its own
DEFAULT_SLIDING_WINDOW = {"mistral": 4096}


@dataclass
class Config:
    """The shape of a model, named as in HF `config.json`; 0 for kv heads / head_dim = derive."""
    vocab_size: int = opt(32000, "embedding rows (may exceed the tokenizer's ids: Qwen pads)", gt=0)
    hidden_size: int = opt(4096, "width of the residual stream", gt=0)
    intermediate_size: int = opt(11008, "width of the SwiGLU MLP", gt=0)
    num_hidden_layers: int = opt(32, "decoder layers", gt=0)
    num_attention_heads: int = opt(32, "query heads", gt=0)
    num_key_value_heads: int = opt(0, "key/value heads (GQA); 0: as many as query heads", ge=0)
    head_dim: int = opt(0, "width of one head; 0: hidden_size // num_attention_heads", ge=0)
    rms_norm_eps: float = opt(1e-5, "RMSNorm epsilon", gt=0)
    rope_theta: float = opt(10000.0, "RoPE base", gt=0)
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = opt(2048, "longest sequence the model was trained for", gt=0)
    tie_word_embeddings: bool = opt(False, "lm_head shares the embedding's tensor")
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: ModelType = opt("llama", "the family (see FAMILIES)")
    attention_bias: bool = opt(False, "biases on q/k/v projections (qwen2)")
    qk_norm: bool = opt(False, "RMSNorm on each head's q and k before RoPE (qwen3)")
    sliding_window: int | None = opt(None, "mistral: a token sees itself and the window - 1 before it", gt=0)
    name_or_path: str | None = dataclasses.field(default=None, compare=False, repr=False)  # the folder read

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise SFTError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                           f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise SFTError(f"head_dim={self.head_dim} must be a positive even number (RoPE turns pairs)")
        if self.model_type not in FAMILIES:
            raise SFTError(f"model_type {self.model_type!r} is not implemented; known: {', '.join(FAMILIES)}")
        fam = FAMILIES[self.model_type]
        if (self.attention_bias, self.qk_norm) != (fam.attention_bias, fam.qk_norm):
            raise SFTError(f"model_type {self.model_type!r} has attention_bias={fam.attention_bias}, "
                           f"qk_norm={fam.qk_norm}; got {self.attention_bias}, {self.qk_norm}")
        if self.sliding_window is not None and "sliding_window" not in fam.keys:
            raise SFTError(f"sliding_window is not implemented for model_type {self.model_type!r}")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    @classmethod
    def for_family(cls, model_type: ModelType, **shape) -> "Config":
        """A Config with the family's flags set (tests and benchmarks build models this way)."""
        fam = FAMILIES[model_type]
        return cls(model_type=model_type, attention_bias=fam.attention_bias, qk_norm=fam.qk_norm, **shape)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "Config":
        """Read a Hugging Face `config.json` dict; anything missing, mistyped or not implemented
        is an SFTError naming `source` and the key (see the module docstring)."""
        return from_hf(hf, source)

    def to_hf(self) -> dict:
        """The `config.json` dict transformers reads back as the same model (legacy `rope_theta`
        and `rope_scaling` keys, read by transformers 4.x and 5.x)."""
        return to_hf(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _field(hf: dict, key: str, typ: type, source: str, default: Any = None) -> Any:
    """hf[key] checked against the Config field's type and range; `default` if absent or null."""
    return default if hf.get(key) is None else check_value(hf[key], typ, FIELDS[key], key, source)


def _token_ids(hf: dict, key: str, source: str, vocab: int) -> int | list[int] | None:
    """An id, a list of ids (eos) or null; each must index the embedding."""
    value = hf.get(key)
    ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
    if value is None:
        return None
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab:
            raise SFTError(f"{source}: '{key}' must be a token id in [0, {vocab})"
                           f"{' or a list of them' if key == 'eos_token_id' else ''} or null, got {value!r}")
    return value


def _model_type(hf: dict, source: str) -> str:
    archs, model_type = hf.get("architectures"), hf.get("model_type")
    if archs is not None and (not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES):
        raise SFTError(f"{source}: 'architectures' {archs!r} is not implemented (we build one of "
                       f"{', '.join(ARCHITECTURES)})")
    if model_type is None:  # an old file: the class name says it, or it is a Llama
        return ARCHITECTURES[archs[0]] if archs else "llama"
    if model_type not in FAMILIES:
        raise SFTError(f"{source}: 'model_type' {model_type!r} is not implemented (known: "
                       f"{', '.join(FAMILIES)}); a model we do not build must not load as another")
    if archs and ARCHITECTURES[archs[0]] != model_type:
        raise SFTError(f"{source}: 'architectures' {archs[0]} does not match model_type {model_type!r}")
    return model_type


def _refuse_unimplemented(hf: dict, model_type: str, source: str) -> None:
    """Every key is read by this family, changes nothing, or is a switch left off (see above)."""
    fam, off = FAMILIES[model_type], {**OFF_KEYS["*"], **OFF_KEYS[model_type]}
    for key in [k for k in off if k in hf]:  # the switches first: they decide what else matters
        want, value = off[key], hf[key]
        same_type = isinstance(value, bool) if isinstance(want, bool) else \
            isinstance(value, (int, float)) and not isinstance(value, bool)
        if not same_type:
            raise SFTError(f"{source}: '{key}' must be {type(want).__name__}, got {value!r}")
        if value != want:
            raise _not_implemented(source, key, value, model_type)
    for key, value in hf.items():
        if key in SHAPE_KEYS or key in fam.keys or key in NEUTRAL_KEYS or key in off:
            continue
        if value is None and key in WHY:  # a feature key written as null: the feature is off
            continue
        if key not in IGNORED_WHEN_OFF.get(model_type, ()):
            raise _not_implemented(source, key, value, model_type)
        if key == "layer_types" and value is not None and (
                not isinstance(value, list) or any(t != "full_attention" for t in value)):
            raise SFTError(f"{source}: 'layer_types' {value!r}: only full_attention layers are implemented")


def _not_implemented(source: str, key: str, value: Any, model_type: str) -> SFTError:
    why = f" ({WHY[key]})" if key in WHY else ""
    return SFTError(f"{source}: '{key}': {value!r}{why} is not implemented for model_type "
                    f"{model_type!r}; a setting that changes the model's math is refused, never ignored")


def _rope(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, scaling or None) from `rope_theta`/`rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    merged: dict[str, Any] = {}
    for key in ("rope_parameters", "rope_scaling"):
        part = hf.get(key)
        if part is None:
            continue
        if not isinstance(part, dict):
            raise SFTError(f"{source}: '{key}' must be an object or null, got {part!r}")
        for name, value in part.items():
            name = "rope_type" if name == "type" else name
            if name in merged and merged[name] != value:
                raise SFTError(f"{source}: '{key}.{name}' = {value!r} contradicts {merged[name]!r}")
            merged[name] = value
    if "rope_theta" in hf:
        if merged.get("rope_theta", hf["rope_theta"]) != hf["rope_theta"]:
            raise SFTError(f"{source}: 'rope_theta' {hf['rope_theta']!r} contradicts rope_parameters")
        merged["rope_theta"] = hf["rope_theta"]
    theta = _field(merged, "rope_theta", float, source, 10000.0)
    kind = merged.pop("rope_type", "default")
    merged.pop("rope_theta", None)
    if kind not in ROPE_TYPES:
        raise SFTError(f"{source}: rope scaling type {kind!r} is not implemented (only "
                       f"{', '.join(ROPE_TYPES)}); it would change every position's angle")
    extra = sorted(set(merged) - set(ROPE_TYPES[kind]))
    missing = [k for k in ROPE_TYPES[kind] if k not in merged]
    if extra:
        raise SFTError(f"{source}: rope parameter '{extra[0]}' is not implemented for rope type {kind!r}")
    if missing:
        raise SFTError(f"{source}: {kind} rope scaling needs {missing}")
    for name, value in merged.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if not ok or (name == "original_max_position_embeddings" and not isinstance(value, int)):
            raise SFTError(f"{source}: rope parameter '{name}' must be a positive number, got {value!r}")
    if kind == "llama3" and merged["high_freq_factor"] <= merged["low_freq_factor"]:
        raise SFTError(f"{source}: llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return theta, ({"rope_type": kind, **{k: float(v) if k != "original_max_position_embeddings" else v
                                           for k, v in merged.items()}} if kind != "default" else None)


def from_hf(hf: dict, source: str = "config.json") -> Config:
    """See Config.from_hf."""
    if not isinstance(hf, dict):
        raise SFTError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = _model_type(hf, source)
    _refuse_unimplemented(hf, model_type, source)
    shape = {}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise SFTError(f"{source}: missing key {key!r} (is this a {model_type} config.json?)")
        shape[key] = check_value(hf[key], int, FIELDS[key], key, source)
    if hf.get("hidden_act", "silu") != "silu":
        raise SFTError(f"{source}: 'hidden_act' {hf['hidden_act']!r} is not implemented (only 'silu')")
    theta, scaling = _rope(hf, source)
    window = None  # (qwen's sliding_window is ignored while use_sliding_window is off)
    if "sliding_window" in FAMILIES[model_type].keys:
        window = (_field(hf, "sliding_window", int, source) if "sliding_window" in hf
                  else DEFAULT_SLIDING_WINDOW[model_type])
    fam = FAMILIES[model_type]
    try:  # __post_init__ checks the head counts; say which file they came from
        return Config(
            **shape, num_key_value_heads=_field(hf, "num_key_value_heads", int, source, 0),
            head_dim=_field(hf, "head_dim", int, source, DEFAULT_HEAD_DIM.get(model_type, 0)),
            rms_norm_eps=_field(hf, "rms_norm_eps", float, source, 1e-6), rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_field(hf, "max_position_embeddings", int, source, 2048),
            tie_word_embeddings=_field(hf, "tie_word_embeddings", bool, source, False),
            bos_token_id=_token_ids(hf, "bos_token_id", source, shape["vocab_size"]),
            eos_token_id=_token_ids(hf, "eos_token_id", source, shape["vocab_size"]),
            pad_token_id=_token_ids(hf, "pad_token_id", source, shape["vocab_size"]),
            model_type=model_type, attention_bias=fam.attention_bias, qk_norm=fam.qk_norm,
            sliding_window=window)
    except SFTError as e:
        raise SFTError(f"{source}: {e}") from None


def to_hf(cfg: Config) -> dict:
    """See Config.to_hf: the shape, then the family's own keys, each switch written off."""
    d = {k: getattr(cfg, k) for k in FIELDS if k in SHAPE_KEYS}
    d.update(architectures=[FAMILIES[cfg.model_type].architecture], model_type=cfg.model_type,
             hidden_act="silu", attention_dropout=0.0)
    if cfg.rope_scaling is None:
        del d["rope_scaling"]
    family_keys = {"llama": dict(attention_bias=False, mlp_bias=False),
                   "qwen2": dict(use_sliding_window=False, sliding_window=None),
                   "qwen3": dict(attention_bias=False, use_sliding_window=False, sliding_window=None),
                   "mistral": dict(sliding_window=cfg.sliding_window)}
    d.update(family_keys[cfg.model_type])
    return d

