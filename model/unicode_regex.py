"""Split regexes of tokenizer.json (Oniguruma syntax, `\\p{L}` classes) -> Python `re` patterns.

A byte-level BPE cuts text into words with a regex before it merges anything. Llama-3's:

    (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+

(a contraction; letters with at most one leading non-letter; 1-3 digits; punctuation; newlines;
spaces, leaving the last space of a run to the next word). The `tokenizers` library runs it
with Oniguruma. Python's `re` is the same kind of engine (backtracking, the first alternative
that matches wins, greedy quantifiers, lookahead), so the pattern means the same thing in it,
except for the character classes:

* `\\p{L}`, `\\p{N}`, `\\p{Lu}`, ... (Unicode general categories) do not exist in `re`;
* `\\s` in `re` also matches U+001C..U+001F, which are not Unicode White_Space (Oniguruma's `\\s`);
* `\\d` and `\\w` differ in the same small ways.

So `translate(pattern)` rewrites every class escape as an explicit list of code-point ranges,
built once per process from `unicodedata` (one pass over all 1.1M code points, ~0.25 s, then
cached): `\\p{N}` becomes `[\\U00000030-\\U00000039\\U000000b2-...]`. Everything else is copied.
The ranges follow the Unicode version of this Python's `unicodedata` (3.11: Unicode 14.0);
the `tokenizers` library's may be newer, so a character assigned since (rare) can split
differently.

Supported syntax: literal characters and escaped punctuation (`\\'`, `\\-`, `\\\\`, ...); `\\t \\n
\\r \\f \\v \\a \\e`, `\\xHH`, `\\x{H...}`, `\\uHHHH`; classes `\\p{X}` `\\P{X}` `\\p{^X}` with X a
general category (L, Lu, Ll, Lt, Lm, Lo, M, Mn, Mc, Me, N, Nd, Nl, No, P, Pc, Pd, Ps, Pe, Pi,
Pf, Po, S, Sm, Sc, Sk, So, Z, Zs, Zl, Zp, C, Cc, Cf, Cs, Co, Cn), `\\s \\S` (White_Space),
`\\d \\D` (Nd), `\\w \\W` (L, M, Nd, Pc), all of them inside or outside `[...]`; bracket
classes with `^`, ranges and escapes; `.`; `|`; groups `(...)` (made non-capturing), `(?:...)`,
`(?i:...)`, `(?i)` at the very start, lookarounds `(?=` `(?!` `(?<=` `(?<!`; quantifiers `?`
`*` `+` `{n}` `{n,}` `{n,m}` `{,m}`, also lazy (`*?`). `^` and `$` are line anchors, as in
Oniguruma's Ruby syntax. Anything else (`\\b`, `\\A`, `\\h`, `\\X`, `\\p{Han}`, backreferences,
named or atomic groups, possessive quantifiers, `[[:alpha:]]`, `&&`, other flags) is refused
by name with an SFTError naming the tokenizer.json key.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from itertools import groupby

from model.errors import SFTError

# Unicode White_Space: Oniguruma's \s and the whitespace that added tokens' lstrip/rstrip eat
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
    "\u2028\u2029\u202f\u205f\u3000"
CATEGORIES = ("Lu Ll Lt Lm Lo Mn Mc Me Nd Nl No Pc Pd Ps Pe Pi Pf Po Sm Sc Sk So Zs Zl Zp "
              "Cc Cf Cs Co Cn").split()
_ESCAPED_CHARS = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "e": "\x1b"}
_CLASS_LETTERS = {"s": "White_Space", "d": "Nd", "w": "L M Nd Pc"}

Ranges = list[tuple[int, int]]


@functools.cache
def _category_ranges() -> dict[str, Ranges]:
    """Code-point ranges of each two-letter general category: one pass over all code points."""
    out: dict[str, Ranges] = {c: [] for c in CATEGORIES}
    start = 0
    for cat, run in groupby(map(unicodedata.category, map(chr, range(0x110000)))):
        n = len(list(run))
        out[cat].append((start, start + n - 1))
        start += n
    return out


@functools.cache
def class_ranges(name: str) -> tuple[tuple[int, int], ...]:
    """Sorted, merged ranges of a class: a category ("L", "Nd"), "White_Space", or several
    separated by spaces ("L M Nd Pc")."""
    if name == "White_Space":
        return tuple((ord(c), ord(c)) for c in WHITE_SPACE)
    cats = [c for part in name.split() for c in CATEGORIES if c.startswith(part)]
    merged: Ranges = []
    for lo, hi in sorted(r for c in cats for r in _category_ranges()[c]):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def _complement(ranges) -> Ranges:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    return out + ([(nxt, 0x10FFFF)] if nxt <= 0x10FFFF else [])


def _char(cp: int) -> str:
    return f"\\U{cp:08x}"  # an escape is safe both inside and outside [...]


def _ranges_text(ranges, top: int) -> str:
    """The ranges as `re` class members, cut at code point `top`."""
    return "".join(_char(lo) if lo == min(hi, top) else f"{_char(lo)}-{_char(min(hi, top))}"
                   for lo, hi in ranges if lo <= top)


class _Translator:
    """One left-to-right pass over an Oniguruma pattern, writing the `re` equivalent."""

    def __init__(self, pattern: str, where: str, top: int):
        self.p, self.i, self.where, self.top = pattern, 0, where, top

    def refuse(self, what: str) -> SFTError:
        return SFTError(f"{self.where}: {what} is not supported in the regex (at offset {self.i}; "
                        "supported: the subset listed in model/unicode_regex.py, e.g. \\p{L}, \\s, [...], "
                        "(?i:...), (?!...), {n,m})")

    def peek(self, k: int = 0) -> str:
        return self.p[self.i + k] if self.i + k < len(self.p) else ""

    def escape(self) -> tuple[str, object]:
        """At a backslash: ("char", code point) or ("class", (ranges, negated))."""
        c = self.peek(1)
        self.i += 2
        if c in "pP":
            m = re.match(r"\{(\^?)([A-Z][a-z]?)\}", self.p[self.i:])
            if not m or not any(cat.startswith(m[2]) for cat in CATEGORIES):
                raise self.refuse(f"'\\{c}{self.p[self.i:self.i + 12].split('}')[0]}}}' (only general "
                                  "categories such as \\p{L}, \\p{Lu})")
            self.i += m.end()
            return "class", (class_ranges(m[2]), (c == "P") != bool(m[1]))
        if c.lower() in _CLASS_LETTERS:
            return "class", (class_ranges(_CLASS_LETTERS[c.lower()]), c.isupper())
        if c in _ESCAPED_CHARS:
            return "char", ord(_ESCAPED_CHARS[c])
        m = re.match(r"x\{([0-9a-fA-F]{1,6})\}|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})", self.p[self.i - 1:])
        if m:
            self.i += m.end() - 1
            return "char", int(m[1] or m[2] or m[3], 16)
        if c and not c.isalnum():
            return "char", ord(c)
        self.i -= 2
        raise self.refuse(f"'\\{c}'")

    def bracket(self) -> str:
        """A [...] class -> the `re` class with every member written out."""
        self.i += 1
        negated = self.peek() == "^"
        self.i += negated
        parts: list[str] = []
        while self.peek() != "]" or not parts:
            c = self.peek()
            if not c:
                raise self.refuse("an unterminated '['")
            if c == "[" or (c == "&" and self.peek(1) == "&"):
                raise self.refuse(f"'{c}{self.peek(1)}' inside a class (nested classes, POSIX brackets, &&)")
            kind, value = self.escape() if c == "\\" else ("char", ord(c))
            self.i += c != "\\"
            if kind == "class":
                ranges, neg = value
                parts.append(_ranges_text(_complement(ranges) if neg else ranges, self.top))
            elif self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi_c = self.peek()
                hi_kind, hi = self.escape() if hi_c == "\\" else ("char", ord(hi_c))
                self.i += hi_c != "\\"
                if hi_kind != "char" or hi < value:
                    raise self.refuse("a range whose end is a class or below its start")
                parts.append(_ranges_text([(value, hi)], self.top))
            else:
                parts.append(_char(value))
        self.i += 1
        return ("[^" if negated else "[") + "".join(parts) + "]"

    def group(self) -> str:
        rest = self.p[self.i:]
        for opening, out in (("(?:", "(?:"), ("(?i:", "(?i:"), ("(?=", "(?="), ("(?!", "(?!"),
                             ("(?<=", "(?<="), ("(?<!", "(?<!")):
            if rest.startswith(opening):
                self.i += len(opening)
                return out
        if rest.startswith("(?i)") and self.i == 0:
            self.i += 4
            return "(?i)"
        if rest.startswith("(?"):
            raise self.refuse(f"the group '{rest[:4]}' (named, atomic, comment or flag groups)")
        self.i += 1
        return "(?:"  # we never read captures, and findall would return them instead of matches

    def quantifier_end(self) -> str:
        """After a quantifier: a lazy '?' is copied; Oniguruma's possessive '+' is refused."""
        if self.peek() == "?":
            self.i += 1
            return "?"
        if self.peek() == "+":
            raise self.refuse("a possessive quantifier")
        return ""

    def run(self) -> str:
        out: list[str] = []
        while self.i < len(self.p):
            c = self.peek()
            if c == "\\":
                kind, value = self.escape()
                if kind == "char":
                    out.append(_char(value))
                else:
                    ranges, neg = value
                    out.append(("[^" if neg else "[") + _ranges_text(ranges, self.top) + "]")
            elif c == "[":
                out.append(self.bracket())
            elif c == "(":
                out.append(self.group())
            elif c in "?*+":
                self.i += 1
                out.append(c + self.quantifier_end())
            elif c == "{" and (m := re.match(r"\{(\d*)(,\d*)?\}", self.p[self.i:])) and (m[1] or m[2] not in (None, ",")):
                self.i += m.end()
                out.append(m[0] + self.quantifier_end())
            elif c in "^$":
                self.i += 1
                out.append(f"(?m:{c})")
            else:
                self.i += 1
                out.append(c if c in ".|)" else re.escape(c))
        return "".join(out)


@functools.lru_cache(maxsize=32)
def translate(pattern: str, where: str = "regex", bmp_only: bool = False) -> re.Pattern:
    """The compiled `re` equivalent of an Oniguruma split pattern from tokenizer.json.

    `where` names the file and key for errors (e.g. "tokenizer.json: pre_tokenizer.pattern.Regex").
    `bmp_only=True` leaves out the classes' members above U+FFFF: the pattern is then only right
    for text without such characters, and 5x faster. Why: `re` tests a character against the
    members below U+FFFF with one table lookup, but against the others (the astral ranges: \\p{L}
    has ~200 of them) one range at a time, and a character that is not in the class (" " tested
    against \\p{L}) is tested against all of them. Text rarely holds astral characters (emoji),
    so callers keep both patterns and pick by the text (`has_astral`).
    """
    text = _Translator(pattern, where, 0xFFFF if bmp_only else 0x10FFFF).run()
    try:
        return re.compile(text)
    except re.error as e:
        raise SFTError(f"{where}: the regex does not compile in Python's re ({e.msg})") from None


def has_astral(text: str) -> bool:
    """True when `text` holds a character above U+FFFF (an emoji, a rare CJK ideograph...)."""
    return not text.isascii() and max(text) > "\uffff"
