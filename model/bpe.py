"""Byte-level BPE from a Hugging Face `tokenizer.json`, by hand (Llama-3.x, Qwen2.5, Qwen3, SmolLM2).

BPE, the way Karpathy's minbpe teaches it, in four ideas:

1. **Bytes.** Text is UTF-8 bytes, so every string is a sequence of numbers 0..255 and nothing
   is ever unknown: "héllo" is 68 c3 a9 6c 6c 6f (é takes two bytes).
2. **Merges, lowest rank first.** Training counted the most frequent adjacent pair, made it a new
   token and repeated; `model.merges` lists the pairs in the order they were learned, so a
   pair's index is its rank. Encoding replays them: among the adjacent pairs of a word, merge
   the one with the lowest rank (the leftmost if it occurs twice), and repeat until no adjacent
   pair is in the list. With the Llama-3 merges, " world" (Ġ is the space, see 3) goes
   Ġ w o r l d -> Ġ w or l d (rank 22) -> Ġw or l d (51) -> Ġw or ld (447) -> Ġw orld (2,548)
   -> Ġworld (3,906) = id 1917.
3. **The byte table.** tokenizer.json stores tokens as strings, not bytes. GPT-2's table maps
   each byte to a printable character: printable ASCII and Latin-1 map to themselves, the 68
   others (control bytes, space, 0x7f-0xa0, 0xad) to U+0100 onwards, so space is 'Ġ', newline
   'Ċ', and " hello" is stored as "Ġhello". Decoding runs the table backwards: ids -> token
   strings -> bytes -> UTF-8 (a byte sequence cut mid-character decodes to U+FFFD).
4. **Pre-tokenization.** Merges never cross a word boundary: a regex first cuts the text into
   words ("Hello world!" -> "Hello", " world", "!"), each merged on its own. Llama-3's regex
   keeps digits in runs of 1-3, Qwen's one by one; GPT-2's (`ByteLevel` with `use_regex`) is
   simpler. The patterns use `\\p{L}`-style classes that Python's `re` lacks, so
   model/unicode_regex.py rewrites them into plain `re` (the same matches, by construction).

Before that, **special tokens** ("<|eot_id|>") are cut out of the text (model/tokenizer.py does
this for both tokenizer kinds), and **normalization** runs: Qwen's NFC composes "e" + U+0301
(combining acute) into the single code point "é", so both spellings give the same ids (and
decode(encode(x)) is NFC(x), not x). **ignore_merges** (Llama-3): a word that is itself in the
vocabulary is one token, whatever the merges would have made of it: the Llama-3 vocabulary was
converted from tiktoken, whose merge list does not always rebuild every token.

**Why pure Python is fast enough: a word cache.** Merging one word is a Python loop (a few
microseconds per merge), too slow to run on every word of a corpus. But text repeats its words
(Zipf's law: " the", ",", " of" ...), so we keep a dict from each pre-tokenized word to its ids:
after the first few thousand words almost every word is one dict lookup, and the regex split
runs in C. The dict is bounded (`CACHE_WORDS`; when it is full new words are merged but not
stored, as the `tokenizers` library does). Measured by bench/tokenizer_speed.py on the shared 2-core
machine (figures move by +-30%) over 20,496 texts, 5.3M characters, 1.38M Llama-3 tokens:
96.5% of the words of a first pass are cache hits (44,890 distinct words in 1.3M); a fresh
tokenizer encodes 450-550k tokens/s, a warm one 0.9-1.1M; the `tokenizers` library on one
thread 220-300k (it also builds offsets and an Encoding object per call). Where the time goes
(cProfile): on a first pass, 46% merging the new words (`_merge`), 15% the per-word loop of
`encode`, 13% the regex (`re.findall`, in C); warm, 31% the per-word loop, 29% the regex, 17%
the rest of the split, 11% cutting out added tokens. Loading Llama-3's file takes 0.7-1 s
(JSON, the 280k-entry merge dict, and once per process the Unicode classes, 0.3 s).

What is read from tokenizer.json, and refused by name otherwise (an SFTError naming the file
and key): model `BPE` (vocab; merges as "a b" strings or ["a", "b"] pairs; ignore_merges;
byte_fallback, unk_token, fuse_unk for symbols missing from the vocabulary); normalizer null,
`NFC` or a `Sequence` of them; pre-tokenizer `Split` (regex or string, behavior `Isolated`),
`Digits`, `ByteLevel` (last, with add_prefix_space and use_regex) or a `Sequence` of them;
post-processor `TemplateProcessing` (one optional special token before and after the text),
`ByteLevel` (offsets only: nothing to do for ids), a `Sequence` of them, or null; decoder
`ByteLevel`; `added_tokens`.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import heapq
import json
import operator
import re
import unicodedata

from model.errors import SFTError
from model.unicode_regex import has_astral, translate

CACHE_WORDS = 100_000  # word -> ids entries kept; ~15 MB when full
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: byte -> printable character (see idea 3 in the module docstring)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


BYTE_CHARS = "".join(bytes_to_unicode()[b] for b in range(256))  # str.translate table: latin-1 char -> byte char
CHAR_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _supported(where: str, key: str, value, supported: str) -> SFTError:
    return SFTError(f"{where}: {key} {value!r} is not supported (supported: {supported})")


class BPE:
    """tokenizer.json -> the BPE backend of model.tokenizer.Tokenizer.

    Backend face: normalize(text), encode(text, at_start), decode(ids, at_start),
    piece_to_id / id_to_piece, vocab_size, added_tokens, defaults, special_ids,
    template(bos_id, eos_id), files(extra).
    """

    file_name = "tokenizer.json"
    default_class = "PreTrainedTokenizerFast"
    special_ids: frozenset[int] = frozenset()  # the added tokens flagged special say it all

    def __init__(self, spec: dict, raw: bytes, source: str = "tokenizer.json"):
        """`spec`: the parsed tokenizer.json; `raw`: its bytes, which `files` writes back."""
        self.raw, self.source = raw, source
        if not isinstance(spec, dict):
            raise SFTError(f"{source}: expected a JSON object")
        with _gc_paused():  # 600k new tuples and strings: the collector would rescan them many times (2x slower)
            self._read_model(spec.get("model") or {})
        self.added_tokens = self._read_added(spec.get("added_tokens") or [])
        self.nfc = self._read_normalizer(spec.get("normalizer"), "normalizer")
        self.steps = self._read_pre_tokenizer(spec.get("pre_tokenizer"), "pre_tokenizer")
        if not self.steps or self.steps[-1] != "bytes":
            raise SFTError(f"{source}: pre_tokenizer needs a ByteLevel step, last (only byte-level BPE "
                           "is supported)")
        self.steps.pop()
        self.prefix, self.suffix = self._read_post_processor(spec.get("post_processor"), "post_processor")
        dec = spec.get("decoder")
        if (dec or {}).get("type") != "ByteLevel":
            raise _supported(source, "decoder.type", (dec or {}).get("type"), "ByteLevel")
        by_id = {t["id"]: t["content"] for t in self.added_tokens}
        self.defaults = {"bos_token": by_id.get(self.prefix), "eos_token": by_id.get(self.suffix),
                         "unk_token": self.unk_token}
        self.vocab_size = max([*self.vocab.values(), *by_id]) + 1
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------------- reading tokenizer.json

    def _read_model(self, model: dict) -> None:
        where = self.source
        kind = model.get("type", "BPE" if "merges" in model else None)
        if kind != "BPE":
            raise _supported(where, "model.type", kind, "BPE")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise _supported(where, f"model.{key}", model[key], "null or ''")
        if model.get("dropout"):
            raise _supported(where, "model.dropout", model["dropout"], "null (BPE dropout is for training)")
        vocab, merges = model.get("vocab"), model.get("merges")
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            raise SFTError(f"{where}: model.vocab must be an object and model.merges a list")
        self.vocab: dict[str, int] = vocab
        pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]  # "a b" or ["a", "b"]
        firsts, seconds = zip(*pairs) if all(len(p) == 2 for p in pairs) else ((), ())
        if len(firsts) != len(pairs) or not all(map(vocab.__contains__, map(operator.add, firsts, seconds))):
            bad = next(i for i, p in enumerate(pairs) if len(p) != 2 or p[0] + p[1] not in vocab)
            raise SFTError(f"{where}: model.merges[{bad}] {merges[bad]!r} is not two tokens whose "
                           "concatenation is in model.vocab")
        # (a, b) -> rank; a later duplicate wins, as in tokenizers
        self.ranks = dict(zip(zip(firsts, seconds), range(len(pairs))))
        self.ignore_merges = bool(model.get("ignore_merges"))
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.fuse_unk = bool(model.get("fuse_unk"))
        self.unk_token = model.get("unk_token")
        if self.unk_token is not None and self.unk_token not in vocab:
            raise SFTError(f"{where}: model.unk_token {self.unk_token!r} is not in model.vocab")
        # the fast path needs every byte character in the vocabulary (true of every byte-level BPE)
        self.all_bytes = all(c in vocab for c in BYTE_CHARS)

    def _read_added(self, added: list) -> list[dict]:
        """The added tokens; one whose content is also in the vocabulary takes the vocabulary's
        id, whatever the file says, as in the `tokenizers` library."""
        for i, t in enumerate(added):
            if not (isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)):
                raise SFTError(f"{self.source}: added_tokens[{i}] needs an integer 'id' and a 'content' string")
        return [dict(t, id=self.vocab.get(t["content"], t["id"])) for t in added]

    def _read_normalizer(self, spec, key: str) -> bool:
        """True when the text is NFC-normalized."""
        kind = None if spec is None else spec.get("type")
        if kind is None:
            return False
        if kind == "NFC":
            return True
        if kind == "Sequence":
            return any([self._read_normalizer(s, f"{key}.normalizers[{i}]")
                        for i, s in enumerate(spec.get("normalizers") or [])])
        raise _supported(self.source, f"{key}.type", kind, "null, NFC, Sequence")

    def _read_pre_tokenizer(self, spec, key: str) -> list:
        """The split steps in order: a regex (as `_regex` gives it), " " (add a prefix space where
        there is none) or "bytes" (the byte table: the last step)."""
        kind = None if spec is None else spec.get("type")
        where = f"{self.source}: {key}"
        if kind == "Sequence":
            steps = []
            for i, s in enumerate(spec.get("pretokenizers") or []):
                if "bytes" in steps:
                    raise SFTError(f"{where}.pretokenizers[{i}]: a step after ByteLevel is not supported")
                steps += self._read_pre_tokenizer(s, f"{key}.pretokenizers[{i}]")
            return steps
        if kind == "Split":
            if spec.get("behavior") != "Isolated":
                raise _supported(self.source, f"{key}.behavior", spec.get("behavior"), "Isolated")
            if spec.get("invert"):
                raise _supported(self.source, f"{key}.invert", True, "false")
            pattern = spec.get("pattern") or {}
            if "Regex" in pattern:
                return [_regex(pattern["Regex"], f"{where}.pattern.Regex")]
            if isinstance(pattern.get("String"), str):
                return [_regex(re.escape(pattern["String"]), f"{where}.pattern.String")]
            raise SFTError(f"{where}.pattern: needs 'Regex' or 'String'")
        if kind == "Digits":  # Rust's char::is_numeric is the N categories
            return [_regex(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+", where)]
        if kind == "ByteLevel":
            return ([" "] if spec.get("add_prefix_space", True) else []) + \
                ([_regex(GPT2_SPLIT, f"{where} (GPT-2 regex)")] if spec.get("use_regex", True) else []) + ["bytes"]
        raise _supported(self.source, f"{key}.type", kind, "Sequence, Split, Digits, ByteLevel")

    def _read_post_processor(self, spec, key: str) -> tuple[int | None, int | None]:
        """(id of the special token put before the text, id of the one after): what transformers'
        add_special_tokens=True adds. Only one token on each side is supported."""
        kind = None if spec is None else spec.get("type")
        if kind in (None, "ByteLevel"):
            return None, None
        if kind == "Sequence":
            found = [self._read_post_processor(s, f"{key}.processors[{i}]")
                     for i, s in enumerate(spec.get("processors") or [])]
            return (next((p for p, _ in found if p is not None), None),
                    next((s for _, s in found if s is not None), None))
        if kind != "TemplateProcessing":
            raise _supported(self.source, f"{key}.type", kind, "TemplateProcessing, ByteLevel, Sequence, null")
        items = spec.get("single") or []
        seq = [i for i, it in enumerate(items) if "Sequence" in it]
        specials = spec.get("special_tokens") or {}

        def token_id(item: dict) -> int:
            ids = (specials.get(item["SpecialToken"]["id"]) or {}).get("ids") or []
            if len(ids) != 1:
                raise SFTError(f"{self.source}: {key}.special_tokens[{item['SpecialToken']['id']!r}] "
                               "must be one id")
            return ids[0]

        if len(seq) != 1 or seq[0] > 1 or len(items) - seq[0] > 2:
            raise SFTError(f"{self.source}: {key}.single must be [special token] $A [special token] "
                           f"(at most one on each side), got {items!r:.120}")
        before = token_id(items[0]) if seq[0] == 1 else None
        return before, (token_id(items[-1]) if len(items) - seq[0] == 2 else None)

    # ------------------------------------------------------------------------- the backend face

    def normalize(self, text: str) -> str:
        return _nfc(text) if self.nfc else text

    def template(self, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
        """(add_bos, add_eos) of the post-processor; it must add the tokenizer's own BOS/EOS."""
        for name, added, own in (("before", self.prefix, bos_id), ("after", self.suffix, eos_id)):
            if added is not None and added != own:
                raise SFTError(f"{self.source}: post_processor adds id {added} {name} the text, which is "
                               f"not the tokenizer's {'bos' if name == 'before' else 'eos'} token (id {own})")
        return self.prefix is not None, self.suffix is not None

    def encode(self, text: str, at_start: bool = True) -> list[int]:
        """Ids of normalized text without added tokens (`at_start` matters to SentencePiece only)."""
        ids: list[int] = []
        cache = self._cache
        for word in self.words(text):
            try:
                ids += cache[word]
            except KeyError:
                ids += self._word_ids(word)
        return ids

    def words(self, text: str) -> list[str]:
        """The pre-tokenized words of `text` (before the byte table)."""
        pieces = [text] if text else []
        astral = has_astral(text)
        for step in self.steps:
            if step == " ":
                pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            else:
                pieces = [w for p in pieces for w in _split_isolated(step[astral], p)]
        return pieces

    def _word_ids(self, word: str) -> tuple[int, ...]:
        symbols = word.encode("utf-8").decode("latin-1").translate(BYTE_CHARS)
        if self.ignore_merges and symbols in self.vocab:
            ids = (self.vocab[symbols],)
        else:
            ids = tuple(map(self.vocab.__getitem__, self._merge(self._symbols(symbols))))
        if len(self._cache) < CACHE_WORDS:
            self._cache[word] = ids
        return ids

    def _symbols(self, symbols: str) -> list[str]:
        """One symbol per byte character; one missing from the vocabulary becomes its <0xXX>
        tokens (byte_fallback), else unk_token (consecutive ones fused with fuse_unk), else it is
        dropped, as the `tokenizers` library does."""
        if self.all_bytes:
            return list(symbols)
        out: list[str] = []
        for c in symbols:
            fallback = [f"<0x{b:02X}>" for b in c.encode("utf-8")] if self.byte_fallback else []
            if c in self.vocab:
                out.append(c)
            elif fallback and all(f in self.vocab for f in fallback):
                out += fallback
            elif self.unk_token is not None and not (self.fuse_unk and out and out[-1] == self.unk_token):
                out.append(self.unk_token)
        return out

    def _merge(self, parts: list[str]) -> list[str]:
        """Apply merges, lowest rank first (the leftmost of equal ranks), until none applies (idea 2).

        A heap of (rank, position) over the adjacent pairs, as in the `tokenizers` library: each
        step pops the best pair, merges it and pushes the two new pairs beside it; an entry whose
        pair has changed since it was pushed is skipped. That is O(n log n) for a word of n bytes:
        a 5,000-byte word without a space costs 20 ms instead of the 600 ms of re-scanning all
        pairs after each merge (O(n^2)), and ordinary words cost the same either way (measured).
        """
        ranks = self.ranks
        n = len(parts)
        nxt = list(range(1, n + 1))  # a linked list over the parts; a merged-away part becomes None
        prv = list(range(-1, n - 1))
        heap = [(r, i) for i, pair in enumerate(zip(parts, parts[1:])) if (r := ranks.get(pair)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if parts[i] is None or j >= n or ranks.get((parts[i], parts[j])) != rank:
                continue  # stale: one of the two parts has been merged since
            parts[i], parts[j], nxt[i] = parts[i] + parts[j], None, nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            for left in (prv[i], i):  # the new pairs on both sides of the merged part
                if left >= 0 and nxt[left] < n and (r := ranks.get((parts[left], parts[nxt[left]]))) is not None:
                    heapq.heappush(heap, (r, left))
        return [p for p in parts if p is not None]

    def decode(self, ids: list[int], at_start: bool = True) -> str:
        """Text of vocabulary ids (added tokens are decoded by the Tokenizer); an id that is no
        token (Qwen's padding rows) decodes to nothing, as in the `tokenizers` library."""
        get = self._id_bytes.get
        return b"".join([get(i, b"") for i in ids]).decode("utf-8", errors="replace")

    @functools.cached_property
    def _id_bytes(self) -> dict[int, bytes]:
        # a token made of byte characters is those bytes; any other token (none in a byte-level
        # vocabulary) stands for its own UTF-8, as in the tokenizers ByteLevel decoder
        def to_bytes(tok: str) -> bytes:
            return bytes(map(CHAR_BYTE.__getitem__, tok)) if all(c in CHAR_BYTE for c in tok) else tok.encode()
        return {i: to_bytes(tok) for tok, i in self.vocab.items()}

    @functools.cached_property
    def _id_to_piece(self) -> dict[int, str]:
        return {i: tok for tok, i in self.vocab.items()}

    def piece_to_id(self, piece: str) -> int | None:
        return self.vocab.get(piece)

    def id_to_piece(self, idx: int) -> str | None:
        return self._id_to_piece.get(idx)

    def files(self, extra: list[dict]) -> dict[str, bytes]:
        """{"tokenizer.json": bytes}: the file as loaded, or with `extra` added tokens appended."""
        if not extra:
            return {self.file_name: self.raw}
        spec = json.loads(self.raw)
        spec["added_tokens"] = list(spec.get("added_tokens") or []) + extra
        return {self.file_name: json.dumps(spec, indent=2, ensure_ascii=False).encode("utf-8")}  # HF's own layout


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _regex(pattern: str, where: str) -> tuple:
    """(pattern for text without astral characters, pattern for any text): see unicode_regex.translate."""
    return translate(pattern, where, bmp_only=True), translate(pattern, where)


def _nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def _split_isolated(regex, text: str) -> list[str]:
    """Matches and the text between them, in order (tokenizers' "Isolated" split), no empties."""
    found = regex.findall(text)
    if sum(map(len, found)) == len(text):  # the usual case: the matches cover the text
        return [w for w in found if w] if "" in found else found
    out, end = [], 0
    for m in regex.finditer(text):
        out += [text[end:m.start()], m.group()]
        end = m.end()
    return [w for w in out + [text[end:]] if w]
