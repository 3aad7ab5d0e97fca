"""Text <-> token ids: a SentencePiece model plus the special tokens of a Hugging Face folder.

Llama-family tokenizers are a SentencePiece model (`tokenizer.model`) with some bookkeeping
around it in JSON files:

* `tokenizer_config.json`: `added_tokens_decoder` {id: {"content": "<|im_start|>", ...}}, the
  names of bos/eos/pad/unk, `add_bos_token`, `legacy`, and the `chat_template`.
* `special_tokens_map.json`: bos/eos/pad/unk (and `additional_special_tokens`) by string.
* `added_tokens.json`: {"<|im_start|>": 32000, ...} for tokens beyond the SentencePiece vocab.

Encoding first splits the text on the added-token strings (longest first), so "<|im_start|>"
becomes one id instead of eight pieces of punctuation; the text between them goes through
SentencePiece.

The dummy prefix. SentencePiece (Llama settings) prepends a space to its input so that "Hello"
at the start of a text is the same token as " Hello" inside it ("▁Hello"). Hugging Face's
non-legacy Llama tokenizer (`legacy: false`, the default for every modern checkpoint) adds that
space only at the very start of the text (and not even there when the text already starts with a
space), never to a chunk that follows a special token: "<s>[INST]" must give "[", "INST", "]",
not "▁[", ... We reproduce this with a second copy of
the model whose `add_dummy_prefix` is switched off. It is switched off without protobuf: a
serialized protobuf message may repeat a sub-message, and the parser merges the copies field by
field, so appending `normalizer_spec { add_dummy_prefix: false }` (4 bytes: 1a 02 18 00) to the
model file overrides that one flag.

Known difference: transformers' converted (fast) tokenizer can merge runs of several spaces
differently from SentencePiece ("y  z"); we follow SentencePiece, which the model was trained with.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import sentencepiece as spm

from model.errors import SFTError
from model.files import atomic_write, read_json

NO_DUMMY_PREFIX = bytes([0x1A, 0x02, 0x18, 0x00])  # ModelProto.normalizer_spec.add_dummy_prefix = false


def _content(tok) -> str | None:
    """A special token given as a string or as {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    def __init__(self, model_bytes: bytes, config: dict | None = None,
                 special_map: dict | None = None, added: dict[str, int] | None = None,
                 source: str = "tokenizer.model"):
        self.model_bytes = model_bytes
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
            self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=model_bytes + NO_DUMMY_PREFIX)
        except RuntimeError as e:
            raise SFTError(f"{source}: not a SentencePiece model ({e})") from None
        self.config = dict(config or {})
        # transformers 5 defaults: legacy=False (prefix only at the text start), add_prefix_space=True
        self.legacy = bool(self.config.get("legacy", False))
        self.add_prefix_space = self.config.get("add_prefix_space") is not False
        # added tokens: string -> id, and which of them are "special" (skipped when decoding)
        self.added: dict[str, int] = {}
        self.special: set[int] = {self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()} - {-1}
        self.strip: dict[str, tuple[bool, bool]] = {}  # content -> (lstrip, rstrip)
        for idx, info in (self.config.get("added_tokens_decoder") or {}).items():
            if not (isinstance(info, dict) and isinstance(info.get("content"), str) and str(idx).isdigit()):
                raise SFTError(f"tokenizer_config.json: added_tokens_decoder[{idx!r}] needs an integer "
                               "id and a 'content' string")
            self.added[info["content"]] = int(idx)
            self.strip[info["content"]] = (bool(info.get("lstrip")), bool(info.get("rstrip")))
            if info.get("special", True):
                self.special.add(int(idx))
        for content, idx in (added or {}).items():
            self.added.setdefault(content, int(idx))
            self.special.add(int(idx))
        special_map = special_map or {}
        for tok in special_map.get("additional_special_tokens", []):
            content = _content(tok)
            if content not in self.added:
                self.added[content] = self._piece_id(content, "special_tokens_map.json")
            self.special.add(self.added[content])
        names = {k: _content(self.config.get(k, special_map.get(k)))
                 for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_token = names["bos_token"] or self.sp.id_to_piece(self.sp.bos_id())
        self.eos_token = names["eos_token"] or self.sp.id_to_piece(self.sp.eos_id())
        self.unk_token = names["unk_token"] or self.sp.id_to_piece(self.sp.unk_id())
        self.pad_token = names["pad_token"]
        self.bos_id = self._piece_id(self.bos_token, "tokenizer_config.json bos_token")
        self.eos_id = self._piece_id(self.eos_token, "tokenizer_config.json eos_token")
        self.unk_id = self._piece_id(self.unk_token, "tokenizer_config.json unk_token")
        self.pad_id = self._piece_id(self.pad_token, "tokenizer_config.json pad_token") if self.pad_token else None
        self.chat_template = self.config.get("chat_template")
        self._build_splitter()

    # ------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Tokenizer":
        folder = Path(folder)
        model_path = folder / "tokenizer.model"
        if not model_path.exists():
            raise SFTError(f"{model_path}: missing (only SentencePiece tokenizers are supported; "
                           "a tokenizer.json-only folder cannot be loaded)")
        added = read_json(folder / "added_tokens.json", default={})
        return cls(model_path.read_bytes(), read_json(folder / "tokenizer_config.json", default={}),
                   read_json(folder / "special_tokens_map.json", default={}), added, str(model_path))

    def _piece_id(self, piece: str, where: str) -> int:
        idx = self.token_to_id(piece)
        if idx is None:
            raise SFTError(f"{where}: token {piece!r} is neither an added token nor in tokenizer.model")
        return idx

    def _build_splitter(self) -> None:
        strings = sorted(self.added, key=len, reverse=True)  # longest first: "<|a|>x" before "<|a|>"
        self._split = re.compile("(" + "|".join(map(re.escape, strings)) + ")") if strings else None

    # ------------------------------------------------------------------------- encode / decode

    @property
    def vocab_size(self) -> int:
        return max([self.sp.vocab_size() - 1, *self.added.values()]) + 1

    def token_to_id(self, piece: str) -> int | None:
        if piece in self.added:
            return self.added[piece]
        idx = self.sp.piece_to_id(piece)
        return None if idx == self.sp.unk_id() and piece != self.sp.id_to_piece(idx) else idx

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; added-token strings in it become their single ids."""
        ids = [self.bos_id] if bos else []
        parts = self._split.split(text) if self._split else [text]
        for i, part in enumerate(parts):
            if i % 2:  # odd parts are the matched added tokens
                ids.append(self.added[part])
                continue
            lstrip_next = i + 1 < len(parts) and self.strip.get(parts[i + 1], (False, False))[0]
            rstrip_prev = i > 0 and self.strip.get(parts[i - 1], (False, False))[1]
            part = part.rstrip() if lstrip_next else part
            part = part.lstrip() if rstrip_prev else part
            if not part:
                continue
            # the dummy prefix goes only before the start of the text, and not when the text
            # already starts with a space (HF's Metaspace prepend_scheme="first")
            prefix = self.add_prefix_space and (self.legacy or i == 0) and not part.startswith(" ")
            ids.extend((self.sp if prefix else self.sp_no_prefix).encode(part))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special/added tokens are written as their strings unless skipped."""
        by_id = {v: k for k, v in self.added.items()}
        out: list[str] = []
        run: list[int] = []

        def flush():  # only the text's first run loses its dummy-prefix space, as in encode
            if run:
                out.append((self.sp if not out else self.sp_no_prefix).decode(run))
                run.clear()

        for i in map(int, ids):
            if i in by_id or i in self.special:
                flush()
                if not (skip_special_tokens and i in self.special):
                    out.append(by_id.get(i) or self.sp.id_to_piece(i))
            else:
                run.append(i)
        flush()
        return "".join(out)

    # ------------------------------------------------------------------------- extending / saving

    def add_special_tokens(self, tokens: list[str]) -> int:
        """Add new special tokens at the end of the vocabulary; returns how many were new.

        Afterwards call `model.resize_token_embeddings(tokenizer.vocab_size)`.
        """
        new = [t for t in dict.fromkeys(tokens) if self.token_to_id(t) is None]
        for t in new:
            idx = self.vocab_size
            self.added[t] = idx
            self.special.add(idx)
            self.strip[t] = (False, False)
        self._build_splitter()
        return len(new)

    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json."""
        folder = Path(folder)
        cfg = dict(self.config)
        cfg["added_tokens_decoder"] = {
            str(idx): {"content": tok, "lstrip": self.strip.get(tok, (False, False))[0],
                       "normalized": False, "rstrip": self.strip.get(tok, (False, False))[1],
                       "single_word": False, "special": idx in self.special}
            for tok, idx in sorted({**{self.sp.id_to_piece(i): i for i in self.special
                                       if i < self.sp.vocab_size()}, **self.added}.items(),
                                   key=lambda kv: kv[1])}
        cfg.update(bos_token=self.bos_token, eos_token=self.eos_token, unk_token=self.unk_token,
                   pad_token=self.pad_token, tokenizer_class=cfg.get("tokenizer_class", "LlamaTokenizer"))
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        extra = [t for t, i in self.added.items() if i >= self.sp.vocab_size()]
        smap = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("unk_token", self.unk_token), ("pad_token", self.pad_token)) if v}
        if extra:
            smap["additional_special_tokens"] = [t for t in extra if self.added[t] in self.special]
        files = {"tokenizer.model": self.model_bytes,
                 "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                 "special_tokens_map.json": json.dumps(smap, indent=2, ensure_ascii=False) + "\n"}
        if extra:
            files["added_tokens.json"] = json.dumps({t: self.added[t] for t in extra}, indent=2) + "\n"
        for name, data in files.items():
            atomic_write(folder / name, data)

