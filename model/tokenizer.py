"""Text <-> token ids: one face over two kinds of tokenizer, plus the special tokens of an HF folder.

A Hugging Face folder holds one of two tokenizers; `Tokenizer.from_pretrained` picks it:

* `tokenizer.model`: a SentencePiece model (Llama-2, Mistral v0.1, pico-base), run by the
  sentencepiece library (`SentencePiece` below). It wins when both files are present.
* `tokenizer.json` alone: a byte-level BPE (Llama-3.x, Qwen2.5, Qwen3, SmolLM2), read and run by
  hand in model/bpe.py (`BPE`). Both have the same small backend face.

Around either one, the bookkeeping lives in JSON files and is the same for both (`Tokenizer`):

* added tokens: `added_tokens` of tokenizer.json, `added_tokens_decoder` of tokenizer_config.json
  ({id: {"content": "<|im_start|>", "special", "lstrip", "rstrip", "normalized", ...}}),
  `added_tokens.json` ({"<|im_start|>": 32000}) and `additional_special_tokens` of
  special_tokens_map.json. Encoding first cuts them out of the text, so "<|im_start|>" is one id
  instead of eight pieces of punctuation, as the `tokenizers` library does: leftmost match first,
  the longest one at a position; `lstrip`/`rstrip` tokens swallow the whitespace beside them;
  a `single_word` token only matches with no word character on either side; tokens with
  `normalized: false` are matched in the raw text, the others in the normalized text.
* bos/eos/pad/unk: named by tokenizer_config.json, else special_tokens_map.json, else the
  backend (SentencePiece's <s>, </s>, <unk>; the BPE post-processor's token). Qwen names no BOS:
  `bos_id` is None and `encode(text, bos=True)` prepends nothing (transformers does the same).
  Llama-3's tokenizer_config.json names eos `<|eot_id|>`; its config.json lists three eos ids:
  the stop ids are the checkpoint's business (generation_config.json), not the tokenizer's.
* `encode(text, bos=, eos=)` adds BOS/EOS only when asked: our templates write the BOS string
  into the text themselves. `add_bos`/`add_eos` say what transformers' `add_special_tokens=True`
  would add (SentencePiece: `add_bos_token`/`add_eos_token` of tokenizer_config.json; BPE: the
  TemplateProcessing post-processor, BOS for Llama-3, nothing for Qwen); a caller that wants
  that behaviour writes `tok.encode(text, bos=tok.add_bos, eos=tok.add_eos)`.
* decode writes added tokens as their strings and skips the special ones on request.

The dummy prefix (SentencePiece). SentencePiece (Llama settings) prepends a space to its input so
that "Hello" at the start of a text is the same token as " Hello" inside it ("▁Hello"). Hugging
Face's non-legacy Llama tokenizer (`legacy: false`, the default for every modern checkpoint)
adds that space only at the very start of the text (and not even there when the text already
starts with a space), never to a chunk that follows a special token: "<s>[INST]" must give "[",
"INST", "]", not "▁[", ... We reproduce this with a second copy of the model whose
`add_dummy_prefix` is switched off. It is switched off without protobuf: a serialized protobuf
message may repeat a sub-message, and the parser merges the copies field by field, so appending
`normalizer_spec { add_dummy_prefix: false }` (4 bytes: 1a 02 18 00) to the model file
overrides that one flag.

Known difference: transformers' converted (fast) tokenizer can merge runs of several spaces
differently from SentencePiece ("y  z"); we follow SentencePiece, which the model was trained with.
transformers' `clean_up_tokenization_spaces` (" ." -> ".") is not applied: decode inverts encode.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import sentencepiece as spm

from model.bpe import BPE
from model.errors import SFTError
from model.files import atomic_write, read_bytes, read_json
from model.unicode_regex import WHITE_SPACE

NO_DUMMY_PREFIX = bytes([0x1A, 0x02, 0x18, 0x00])  # ModelProto.normalizer_spec.add_dummy_prefix = false


def _json_object(path: Path, required: bool = False) -> dict:
    """A tokenizer JSON file that must hold an object ({} when an optional one is absent)."""
    data = read_json(path, path.name) if required else read_json(path, path.name, default={})
    if not isinstance(data, dict):
        raise SFTError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def token_content(tok) -> str | None:
    """A special token given as a string or as {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


@dataclass(frozen=True)
class AddedToken:
    """A string cut out of the text before the tokenizer proper sees it, and its one id."""
    content: str
    id: int
    special: bool = True  # skipped by decode(skip_special_tokens=True)
    lstrip: bool = False  # swallows the whitespace on its left
    rstrip: bool = False  # ... and on its right
    normalized: bool = False  # matched in the normalized text, not the raw one
    single_word: bool = False  # only matched with no word character on either side

    @classmethod
    def from_json(cls, d: dict, idx: int, special_default: bool = True) -> "AddedToken":
        return cls(d["content"], idx, bool(d.get("special", special_default)), bool(d.get("lstrip")),
                   bool(d.get("rstrip")), bool(d.get("normalized")), bool(d.get("single_word")))

    def to_json(self) -> dict:
        """tokenizer.json's layout (tokenizer_config.json's is the same without "id")."""
        return {"id": self.id, "content": self.content, "single_word": self.single_word, "lstrip": self.lstrip,
                "rstrip": self.rstrip, "normalized": self.normalized, "special": self.special}


def _is_word_char(c: str) -> bool:
    """Unicode \\w as the tokenizers library's regex crate has it (letters, marks, digits, _ ...)."""
    return unicodedata.category(c)[0] in "LM" or unicodedata.category(c) in ("Nd", "Nl", "Pc")


def _cut_added(text: str, pattern: re.Pattern | None, tokens: dict[str, AddedToken]) -> list[tuple[str, int | None]]:
    """[(text, None) or (token content, id)]: `text` with the added tokens that `pattern` finds
    cut out (the rules are in the module docstring). Empty text pieces are left out."""
    if pattern is None:
        return [(text, None)] if text else []
    out: list[tuple[str, int | None]] = []
    done = 0
    for m in pattern.finditer(text):
        tok, start, stop = tokens[m.group()], m.start(), m.end()
        if start < done:  # inside whitespace an rstrip token already took
            continue
        if tok.single_word and ((start > 0 and _is_word_char(text[start - 1]))
                                or (stop < len(text) and _is_word_char(text[stop]))):
            continue
        if tok.lstrip:
            start = max(len(text[:start].rstrip(WHITE_SPACE)), done)
        if tok.rstrip:
            stop = len(text) - len(text[stop:].lstrip(WHITE_SPACE))
        if done < start:
            out.append((text[done:start], None))
        out.append((tok.content, tok.id))
        done = stop
    if done < len(text):
        out.append((text[done:], None))
    return out


class SentencePiece:
    """tokenizer.model through the sentencepiece library, with the dummy-prefix rule above."""

    file_name = "tokenizer.model"
    default_class = "LlamaTokenizer"

    def __init__(self, model_bytes: bytes, config: dict, source: str = "tokenizer.model"):
        self.model_bytes, self.config = model_bytes, config
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
            self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=model_bytes + NO_DUMMY_PREFIX)
        except RuntimeError as e:
            raise SFTError(f"{source}: not a SentencePiece model ({e})") from None
        # transformers 5 defaults: legacy=False (prefix only at the text start), add_prefix_space=True
        self.legacy = bool(config.get("legacy", False))
        self.add_prefix_space = config.get("add_prefix_space") is not False
        self.vocab_size = self.sp.vocab_size()
        self.special_ids = frozenset({self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()} - {-1})
        self.defaults = {k: self.sp.id_to_piece(i) for k, i in (("bos_token", self.sp.bos_id()),
                         ("eos_token", self.sp.eos_id()), ("unk_token", self.sp.unk_id())) if i >= 0}
        self.added_tokens: list[dict] = []  # they come from the JSON files around tokenizer.model

    def normalize(self, text: str) -> str:
        return text  # SentencePiece normalizes inside encode

    def template(self, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
        return (bool(self.config.get("add_bos_token", True)) and bos_id is not None,
                bool(self.config.get("add_eos_token", False)) and eos_id is not None)

    def encode(self, text: str, at_start: bool) -> list[int]:
        # the dummy prefix goes only before the start of the text, and not when the text
        # already starts with a space (HF's Metaspace prepend_scheme="first")
        prefix = self.add_prefix_space and (self.legacy or at_start) and not text.startswith(" ")
        return (self.sp if prefix else self.sp_no_prefix).encode(text)

    def decode(self, ids: list[int], at_start: bool) -> str:
        # only the text's first run loses its dummy-prefix space, as in encode
        return (self.sp if at_start else self.sp_no_prefix).decode(ids)

    def piece_to_id(self, piece: str) -> int | None:
        idx = self.sp.piece_to_id(piece)
        return None if idx == self.sp.unk_id() and piece != self.sp.id_to_piece(idx) else idx

    def id_to_piece(self, idx: int) -> str | None:
        return self.sp.id_to_piece(idx) if 0 <= idx < self.vocab_size else None

    def files(self, extra: list[dict]) -> dict[str, bytes | str]:
        files: dict[str, bytes | str] = {self.file_name: self.model_bytes}
        if extra:
            files["added_tokens.json"] = json.dumps({t["content"]: t["id"] for t in extra}, indent=2) + "\n"
        return files


Backend = SentencePiece | BPE


class Tokenizer:
    def __init__(self, backend: Backend, config: dict | None = None, special_map: dict | None = None,
                 added: dict[str, int] | None = None):
        self.backend = backend
        self.config = dict(config or {})
        # added tokens by content; the first source that names a string wins
        self.added: dict[str, AddedToken] = {}
        for t in backend.added_tokens:
            self.added.setdefault(t["content"], AddedToken.from_json(t, t["id"], special_default=False))
        for idx, info in (self.config.get("added_tokens_decoder") or {}).items():
            if not (isinstance(info, dict) and isinstance(info.get("content"), str) and str(idx).isdigit()):
                raise SFTError(f"tokenizer_config.json: added_tokens_decoder[{idx!r}] needs an integer "
                               "id and a 'content' string")
            self.added.setdefault(info["content"], AddedToken.from_json(info, int(idx)))
        for content, idx in (added or {}).items():
            self.added.setdefault(content, AddedToken(content, int(idx)))
        special_map = special_map or {}
        for tok in special_map.get("additional_special_tokens", []):
            content = token_content(tok)
            known = self.added.get(content) or AddedToken(content, self._piece_id(content, "special_tokens_map.json"))
            self.added[content] = dataclasses.replace(known, special=True)
        names = {k: token_content(self.config.get(k, special_map.get(k))) or backend.defaults.get(k)
                 for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_token, self.eos_token = names["bos_token"], names["eos_token"]
        self.unk_token, self.pad_token = names["unk_token"], names["pad_token"]
        self.bos_id = self._piece_id(self.bos_token, "tokenizer_config.json bos_token") if self.bos_token else None
        self.eos_id = self._piece_id(self.eos_token, "tokenizer_config.json eos_token") if self.eos_token else None
        self.unk_id = self._piece_id(self.unk_token, "tokenizer_config.json unk_token") if self.unk_token else None
        self.pad_id = self._piece_id(self.pad_token, "tokenizer_config.json pad_token") if self.pad_token else None
        self.add_bos, self.add_eos = backend.template(self.bos_id, self.eos_id)
        self.chat_template = self.config.get("chat_template")
        self._build_splitter()

    # ------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Tokenizer":
        folder = Path(folder)
        config = _json_object(folder / "tokenizer_config.json")
        special_map = _json_object(folder / "special_tokens_map.json")
        model_path, json_path = folder / "tokenizer.model", folder / "tokenizer.json"
        if model_path.exists():
            backend = SentencePiece(read_bytes(model_path, "SentencePiece tokenizer.model"), config, str(model_path))
            added = _json_object(folder / "added_tokens.json")
            bad = next((k for k, v in added.items() if not isinstance(v, int) or isinstance(v, bool)), None)
            if bad is not None:
                raise SFTError(f"{folder / 'added_tokens.json'}: {bad!r} maps to {added[bad]!r}, not a token id")
            return cls(backend, config, special_map, added)
        if json_path.exists():
            data = read_bytes(json_path, "tokenizer.json")
            return cls(BPE(_json_object(json_path, required=True), data, str(json_path)), config, special_map)
        raise SFTError(f"{model_path}: missing, and no tokenizer.json either (a folder needs a SentencePiece "
                       "tokenizer.model or a byte-level BPE tokenizer.json)")

    def _piece_id(self, piece: str, where: str) -> int:
        idx = self.token_to_id(piece)
        if idx is None:
            raise SFTError(f"{where}: token {piece!r} is neither an added token nor in {self.backend.file_name}")
        return idx

    def _build_splitter(self) -> None:
        def pattern(tokens: list[str]) -> re.Pattern | None:
            tokens = sorted(tokens, key=len, reverse=True)  # longest first: "<|a|>x" before "<|a|>"
            return re.compile("|".join(map(re.escape, tokens))) if tokens else None

        raw = [t for t in self.added.values() if not t.normalized]
        normalized = [t for t in self.added.values() if t.normalized]
        self._raw_tokens = {t.content: t for t in raw}
        self._norm_tokens = {self.backend.normalize(t.content): t for t in normalized}
        self._raw_split, self._norm_split = pattern(list(self._raw_tokens)), pattern(list(self._norm_tokens))
        self.special = set(self.backend.special_ids) | {t.id for t in self.added.values() if t.special}
        self._by_id = {t.id: t for t in self.added.values()}
        self._written_whole = self.special | set(self._by_id)  # decode writes these as strings

    # ------------------------------------------------------------------------- encode / decode

    @property
    def vocab_size(self) -> int:
        return max([self.backend.vocab_size - 1, *(t.id for t in self.added.values())]) + 1

    def token_to_id(self, piece: str) -> int | None:
        """Id of an added token or of a backend piece ("▁Hello", "Ġhello"); None if there is none."""
        if piece in self.added:
            return self.added[piece].id
        return self.backend.piece_to_id(piece)

    def split_added(self, text: str) -> list[tuple[str, int | None]]:
        """`text` as [(piece, None)] text pieces (normalized) and [(content, id)] added tokens."""
        out: list[tuple[str, int | None]] = []
        for piece, idx in _cut_added(text, self._raw_split, self._raw_tokens):
            if idx is None:
                out += _cut_added(self.backend.normalize(piece), self._norm_split, self._norm_tokens)
            else:
                out.append((piece, idx))
        return out

    def encode(self, text: str, bos: bool = False, eos: bool = False, at_start: bool = True) -> list[int]:
        """Token ids of `text`; added-token strings in it become their single ids. `bos`/`eos`
        add the tokenizer's BOS/EOS (nothing when it has none, e.g. Qwen's BOS). at_start=False:
        `text` continues a longer text (no SentencePiece dummy prefix before its first word)."""
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        for i, (piece, idx) in enumerate(self.split_added(text)):
            if idx is None:
                ids += self.backend.encode(piece, at_start=at_start and i == 0)
            else:
                ids.append(idx)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special/added tokens are written as their strings unless skipped."""
        out: list[str] = []
        # runs of ordinary ids go to the backend in one piece (only the text's first run is at_start)
        for whole, run in groupby(map(int, ids), key=self._written_whole.__contains__):
            if not whole:
                out.append(self.backend.decode(list(run), at_start=not out))
                continue
            for i in run:
                if not (skip_special_tokens and i in self.special):
                    out.append(self._by_id[i].content if i in self._by_id else self.backend.id_to_piece(i))
        return "".join(out)

    # ------------------------------------------------------------------------- extending / saving

    def add_special_tokens(self, tokens: list[str]) -> int:
        """Add new special tokens at the end of the vocabulary; returns how many were new.

        Afterwards call `model.resize_token_embeddings(tokenizer.vocab_size)`.
        """
        new = [t for t in dict.fromkeys(tokens) if self.token_to_id(t) is None]
        for t in new:
            self.added[t] = AddedToken(t, self.vocab_size)
        self._build_splitter()
        return len(new)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the backend's file (tokenizer.model, or tokenizer.json: byte for byte the one
        loaded unless tokens were added), tokenizer_config.json (with the chat template),
        special_tokens_map.json and, for SentencePiece with added tokens, added_tokens.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        records = {t.id: t for t in self.added.values()}
        for i in self.special - set(records):
            if i < self.backend.vocab_size:
                records[i] = AddedToken(self.backend.id_to_piece(i), i)
        cfg = dict(self.config)
        cfg["added_tokens_decoder"] = {str(i): {k: v for k, v in sorted(t.to_json().items()) if k != "id"}
                                       for i, t in sorted(records.items())}
        cfg.update(bos_token=self.bos_token, eos_token=self.eos_token, unk_token=self.unk_token,
                   pad_token=self.pad_token, tokenizer_class=cfg.get("tokenizer_class", self.backend.default_class))
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        extra = [t for t in self.added.values() if t.id >= self.backend.vocab_size]
        smap = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("unk_token", self.unk_token), ("pad_token", self.pad_token)) if v}
        if extra:
            smap["additional_special_tokens"] = [t.content for t in extra if t.special]
        files = {**self.backend.files([t.to_json() for t in extra]),
                 "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                 "special_tokens_map.json": json.dumps(smap, indent=2, ensure_ascii=False) + "\n"}
        for name, data in files.items():
            atomic_write(folder / name, data)

