"""The tokenizer and chat template of a Hugging Face folder as GGUF metadata (see model/gguf.py).

llama.cpp carries its own tokenizer implementations and needs only the vocabulary, tagged with
the algorithm to run on it, under `tokenizer.ggml.*`:

* SentencePiece (`tokenizer.model`): `model = "llama"`, one string per id (`tokens`, the pieces
  with "▁" for a space and "<0x0A>" byte pieces), a float `scores` array (the unigram/BPE
  priorities SentencePiece merges by) and `token_type` per id: 1 normal, 2 unknown, 3 control
  (<s>, </s>: never produced from text), 4 user-defined (matched as a whole), 5 unused, 6 byte.
* Byte-level BPE (`tokenizer.json`, GPT-2 style: Llama-3, Qwen2/3): `model = "gpt2"`, tokens in
  the byte-to-unicode alphabet ("Ġ" for a space), `merges` as "a b" strings in rank order, token
  types (added tokens: control when special, user-defined otherwise), and `pre`: the name of the
  regex that splits text into words before BPE. llama.cpp keeps each regex in C++ under a name,
  so we recognise the split pattern and write its name ("llama-bpe", "qwen2"); an unknown pattern
  is an error, because llama.cpp would silently split text differently.
Ids with no token (vocab_size in config.json is often padded past the tokenizer) become
"[PADn]" unused entries, so the list is as long as the embedding matrix.

The dummy prefix (see model/tokenizer.py): llama.cpp puts SentencePiece's leading "▁" before
every run of text that follows a special token, as HF's *legacy* Llama tokenizer does; the
non-legacy one we train with puts it only at the start of the whole text. GGUF can only switch
the prefix on or off, so for a non-legacy tokenizer we write `add_space_prefix = false`: chat
prompts (which begin with BOS) then tokenize exactly as in training, and a raw prompt must spell
out its leading space (" Once upon a time").

Special ids (`bos/eos/unknown/padding_token_id`) come from the names in tokenizer_config.json, and
config.json's ids fill the gaps (Llama-3 names `<|eot_id|>` as eos there while config.json lists
three ids; the chat stop token is the one we want). `add_bos_token` says whether llama.cpp
prepends BOS, as the HF tokenizer does (`tokenizer.json`'s post-processor, or tokenizer_config's
flag). `tokenizer.chat_template` is the jinja llama.cpp and Ollama render conversations with.
"""
from __future__ import annotations

from pathlib import Path

from model.errors import SFTError
from model.files import read_json, read_text
from model.gguf import ARRAY, BOOL, F32, I32, STRING, U32
from model.tokenizer import Tokenizer, token_content

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)  # tokenizer.ggml.token_type
SPLIT_NAMES = {  # tokenizer.json Split regex -> llama.cpp pre-tokenizer name
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
SPECIAL_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


def _looks_special(text: str) -> bool:
    """Added tokens such as <|fim_prefix|> that a checkpoint forgot to mark special."""
    return text.startswith("<|") and text.endswith("|>")


def _padded(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    return [f"[PAD{i}]" for i in range(n_vocab)], [-10000.0] * n_vocab, [UNUSED] * n_vocab


def _place_added(tokens, scores, types, i: int, text: str, special: bool, where: str) -> None:
    if not 0 <= i < len(tokens):
        raise SFTError(f"{where}: added token {text!r} has id {i}, outside the model's vocab_size {len(tokens)}")
    special = special or _looks_special(text)
    tokens[i] = text if special else text.replace("\u2581", " ")  # user-defined text is matched raw
    types[i] = CONTROL if special else USER_DEFINED
    scores[i] = -1000.0


def _sentencepiece(folder: Path, n_vocab: int) -> tuple[dict, dict[str, int | None], dict]:
    tok = Tokenizer.from_pretrained(folder)
    sp = tok.backend.sp
    if sp.vocab_size() > n_vocab:
        raise SFTError(f"{folder / 'tokenizer.model'}: {sp.vocab_size()} pieces but config.json vocab_size is {n_vocab}")
    tokens, scores, types = _padded(n_vocab)
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                    UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    for text, added in tok.added.items():
        i = added.id
        if i >= sp.vocab_size() or types[i] == NORMAL:  # the model's own <s>, <unk>, bytes keep their type
            _place_added(tokens, scores, types, i, text, i in tok.special, str(folder / "tokenizer_config.json"))
    meta = {"tokenizer.ggml.model": (STRING, "llama"), "tokenizer.ggml.pre": (STRING, "default"),
            "tokenizer.ggml.tokens": (ARRAY, (STRING, tokens)), "tokenizer.ggml.scores": (ARRAY, (F32, scores)),
            "tokenizer.ggml.token_type": (ARRAY, (I32, types))}
    # legacy: "▁" after every special token, as llama.cpp does; else off (see the docstring)
    meta["tokenizer.ggml.add_space_prefix"] = (BOOL, tok.backend.add_prefix_space and tok.backend.legacy)
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id, "pad": tok.pad_id}
    adds = {"bos": tok.config.get("add_bos_token", True), "eos": tok.config.get("add_eos_token", False)}
    return meta, ids, adds


def _pre_tokenizer(tj: dict, path: Path) -> str:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if not any(s.get("type") == "ByteLevel" for s in steps):
        raise SFTError(f"{path}: pre_tokenizer has no ByteLevel step; only byte-level BPE can be exported")
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split" and isinstance(s.get("pattern"), dict)]
    if len(regexes) != 1 or regexes[0] not in SPLIT_NAMES:
        raise SFTError(f"{path}: pre_tokenizer split pattern {regexes!r} is not one llama.cpp knows by name "
                       f"(known: Llama-3 'llama-bpe', Qwen2 'qwen2')")
    return SPLIT_NAMES[regexes[0]]


def _byte_level_bpe(folder: Path, n_vocab: int, tok_cfg: dict) -> tuple[dict, dict[str, int | None], dict]:
    path = folder / "tokenizer.json"
    tj = read_json(path, path.name, default={})
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise SFTError(f"{path}: model.type is {model.get('type')!r}; only BPE tokenizers can be exported")
    pre = _pre_tokenizer(tj, path)
    tokens, scores, types = _padded(n_vocab)
    for text, i in model["vocab"].items():
        if not 0 <= i < n_vocab:
            raise SFTError(f"{path}: token {text!r} has id {i}, outside config.json vocab_size {n_vocab}")
        tokens[i], types[i] = text, NORMAL
    by_text = dict(model["vocab"])
    for a in tj.get("added_tokens") or []:
        _place_added(tokens, scores, types, a["id"], a["content"], bool(a.get("special")), str(path))
        by_text[a["content"]] = a["id"]
    # merges come as "a b" strings or, since tokenizers 0.20, as ["a", "b"] pairs (where a space
    # inside a part is written in the byte alphabet, "Ġ", so that "a b" stays unambiguous)
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
              for m in model.get("merges") or []]
    ids = {typ: by_text.get(token_content(tok_cfg.get(f"{typ}_token"))) for typ in SPECIAL_KEYS}
    post = tj.get("post_processor") or {}
    adds = {"bos": tok_cfg.get("add_bos_token") is True, "eos": tok_cfg.get("add_eos_token") is True}
    for step in post.get("processors", [post]):
        if step.get("type") == "TemplateProcessing":  # [bos] $A [eos]: which ends are added
            single = [s.get("SpecialToken", {}).get("id") for s in step.get("single", [])]
            adds = {"bos": len(single) > 1 and single[0] is not None and by_text.get(single[0]) == ids["bos"],
                    "eos": len(single) > 1 and single[-1] is not None and by_text.get(single[-1]) == ids["eos"]}
    meta = {"tokenizer.ggml.model": (STRING, "gpt2"), "tokenizer.ggml.pre": (STRING, pre),
            "tokenizer.ggml.tokens": (ARRAY, (STRING, tokens)), "tokenizer.ggml.token_type": (ARRAY, (I32, types)),
            "tokenizer.ggml.merges": (ARRAY, (STRING, merges))}
    return meta, ids, adds


def chat_template_metadata(folder: Path, tok_cfg: dict, override: str | None) -> dict:
    """`tokenizer.chat_template` from the override, tokenizer_config.json, chat_template.jinja or
    chat_template.json, in that order (named extra templates go under their own keys)."""
    template = override if override is not None else tok_cfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = read_text(folder / "chat_template.jinja", "chat template")
    if template is None:
        template = read_json(folder / "chat_template.json", "chat_template.json", default={}).get("chat_template")
    if template is None:
        return {}
    if isinstance(template, str):
        return {"tokenizer.chat_template": (STRING, template)}
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    meta = {f"tokenizer.chat_template.{n}": (STRING, t) for n, t in named.items() if n != "default"}
    if len(meta) > 0:
        meta["tokenizer.chat_templates"] = (ARRAY, (STRING, [n for n in named if n != "default"]))
    if "default" in named:
        meta["tokenizer.chat_template"] = (STRING, named["default"])
    return meta


def vocab_metadata(folder: str | Path, n_vocab: int, template_jinja: str | None = None) -> dict:
    """Every `tokenizer.*` key for the folder's tokenizer (n_vocab: config.json's vocab_size)."""
    folder = Path(folder)
    tok_cfg = read_json(folder / "tokenizer_config.json", "tokenizer_config.json", default={})
    if (folder / "tokenizer.model").exists():
        meta, ids, adds = _sentencepiece(folder, n_vocab)
    elif (folder / "tokenizer.json").exists():
        meta, ids, adds = _byte_level_bpe(folder, n_vocab, tok_cfg)
    else:
        raise SFTError(f"{folder}: no tokenizer.model or tokenizer.json to export")
    hf = read_json(folder / "config.json", "config.json")
    for typ, key in SPECIAL_KEYS.items():
        i = ids.get(typ)
        i = i if i is not None else hf.get(f"{typ}_token_id")
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_vocab:
            meta[f"tokenizer.ggml.{key}_token_id"] = (U32, i)
    meta["tokenizer.ggml.add_bos_token"] = (BOOL, bool(adds["bos"]))
    meta["tokenizer.ggml.add_eos_token"] = (BOOL, bool(adds["eos"]))
    return {**meta, **chat_template_metadata(folder, tok_cfg, template_jinja)}
