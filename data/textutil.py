"""Text measurements that IFEval's checkers rely on: sentences, words, capital words, language.

IFEval scores a response by *counting* things, so a checker is only as right as its counter.
The reference scorer borrows three counters from outside libraries; we write each by hand and
check them against the reference in tests/parity (instruction-level agreement >= 99%):

* **Words** are maximal runs of word characters, the regex `\\w+` (unicode-aware): "don't"
  is two words, "state-of-the-art" four, "3.14" two.
* **Sentences** follow the Punkt idea (Kiss & Strunk 2006) without its trained tables: a
  sentence may end at `.`, `?` or `!` when it is followed by whitespace and another token, or
  by closing punctuation. A period does *not* end a sentence when the word before it is a
  known abbreviation ("Dr.", "etc." is not one for Punkt!), or when an initial or an ordinal
  ("J.", "3.") is followed by a lowercase word. Text without any end mark is one sentence.
* **Capital words** are tokens in the Penn-Treebank style: punctuation, brackets and `*` are
  split off and contractions are cut ("DON'T" -> "DO" + "N'T", "JOHN'S" -> "JOHN" + "'S"),
  so an all-caps answer counts more tokens than it has words.
* **Language** is told in two steps. The writing system usually settles it (Hangul -> ko,
  Thai -> th, Tamil -> ta, ...). Scripts shared by several languages are split by letters
  only one of them uses (Urdu's ے, Persian's پ/گ with no Urdu letters, Ukrainian's і/ї/є)
  and then by counting frequent function words ("the", "und", "है", "आहे", "छ", ...).
  `detect_language` returns None when the text has no letters, which the checkers treat as
  "cannot tell, so pass", as the reference does.
"""
from __future__ import annotations

import re
import unicodedata

# ----------------------------------------------------------------------------------- words

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Number of `\\w+` runs: the word count IFEval's number_words constraint uses."""
    return len(_WORD.findall(text))


# ------------------------------------------------------------------------------- sentences

# Words that a period follows without ending the sentence (lowercase, final period removed).
# Punkt learned its list from newswire; these are the frequent ones. Single letters c..w are
# there too (initials); "a", "i" are not, since "I." and "a." often end sentences.
_ABBREVIATIONS = frozenset(
    """mr mrs ms dr st jr sr prof gen col lt sen rep reps gov inc ltd co corp cos bros messrs
    jan feb aug sept sep oct nov dec mon tues wed fri calif conn fla ill mich minn tenn va wash
    vs ft ave u.s u.k u.n u.s.a a.m p.m ph.d d.c n.y l.a yr ok
    c d e f g h k l m n p r s t v w""".split()
)
# A candidate end: a token ending in . ? or !, followed by closing punctuation or by
# whitespace and a next token (the next token tells whether it is really an end).
_END_CANDIDATE = re.compile(r"(\S*)([.?!])(?=([)\";}\]*:@'({\[!?‘’“”«»])|\s+(\S+))")
_COMMON_WORDS = frozenset(
    """the a an this that these those it its he she they we you i there here what when where
    why how who which if in on at for from with by to of and but or so as after before
    because while all some many most no not one two three first then now today yes my our
    your his her their us them me also however although since during each every other such
    only just very more less do does did is are was were be been has have had will would can
    could should may might must""".split()
)
# Words Punkt saw right after a number with no sentence break ("2. Who ...").
_NUMBER_COLLOCATIONS = frozenset(
    "who business credit international review letters notable financing dividend commodities"
    " corrections leisure insider".split()
)
_MULTI_INITIAL = re.compile(r"^([^\W\d]\.)+[^\W\d]$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_NUMBER = re.compile(r"^[-+]?[\d,.]*\d[\d,.]*\.$|^\d+(st|nd|rd|th)?\.$")
_LEADING_PUNCT = re.compile(r"^[(\"`{\[:;&#*@)}\]\-,']+")


def _ends_sentence(token: str, mark: str, next_token: str | None) -> bool:
    """Does `token` (which ends with `mark`) close a sentence, given the token after it?"""
    if mark in "?!":
        return True
    word = _LEADING_PUNCT.sub("", token)
    if word == ".":
        return True
    if word.endswith(".."):
        # an ellipsis ends a sentence when a capitalised word follows it
        return next_token is not None and next_token[:1].isupper()
    stem = word[:-1].lower()
    nxt = _LEADING_PUNCT.sub("", next_token or "")
    nxt_word = re.sub(r"\W+$", "", nxt.lower())
    if stem in _ABBREVIATIONS or stem.split("-")[-1] in _ABBREVIATIONS or _MULTI_INITIAL.match(stem):
        # "Dr. Smith" goes on; "... and Co. The next year" ends (a common word follows).
        return nxt[:1].isupper() and nxt_word in _COMMON_WORDS
    if next_token is None:
        return True
    if _NUMBER.match(word) and nxt_word in _NUMBER_COLLOCATIONS:
        return False
    if _INITIAL.match(word) or _NUMBER.match(word):
        if nxt[:1].islower() or (nxt and nxt[0] in ";:,.!?"):
            return False
        # "J. Presper": an initial before a capitalised name is not an end, unless the
        # next word is a common word that usually starts a sentence ("A. The ...").
        if _INITIAL.match(word) and nxt[:1].isupper():
            return nxt_word in _COMMON_WORDS
    return True


def split_sentences(text: str) -> list[str]:
    """Split text into sentences, Punkt-style (see the module docstring)."""
    sentences, start = [], 0
    for m in _END_CANDIDATE.finditer(text):
        if not _ends_sentence(m.group(1) + m.group(2), m.group(2), m.group(4)):
            continue
        sentences.append(text[start : m.end()])
        start = m.start(4) if m.group(4) is not None else m.end()
    sentences.append(text[start:])
    # Closing quotes/brackets that follow an end mark belong to the sentence they close.
    merged: list[str] = []
    for s in sentences:
        lead = re.match(r"[\"')\]}‘’“”«»]+?(?:\s+|$)", s)
        if merged and lead:
            merged[-1] += lead.group(0).rstrip()
            s = s[lead.end() :]
        if s.strip():
            merged.append(s.strip())
    return merged


def count_sentences(text: str) -> int:
    """Number of sentences (IFEval's number_sentences constraint)."""
    return len(split_sentences(text))


# --------------------------------------------------------------------------- capital words

_SPLIT_OFF = re.compile(r"([\[\](){}<>;@#$%&?!*,:\"«»“”‘’„`\u2012-\u2015]|\.{2,}|--)")
_CONTRACTION = re.compile(
    r"(?<=[^' ])('[sSmMdD]|'|'ll|'LL|'re|'RE|'ve|'VE|n't|N'T)$"
)
_FUSED = re.compile(r"(?i)^(can)(not)$|^(gim)(me)$|^(gon)(na)$|^(got)(ta)$|^(lem)(me)$|^(wan)(na)$")


def word_tokens(text: str) -> list[str]:
    """Penn-Treebank-like tokens: punctuation split off, contractions cut."""
    tokens: list[str] = []
    for chunk in _SPLIT_OFF.sub(r" \1 ", text).split():
        if chunk.startswith("'") and len(chunk) > 1 and not _CONTRACTION.match(chunk):
            tokens.append("'")
            chunk = chunk[1:]
        m = _CONTRACTION.search(chunk)
        if m and m.start() > 0:
            tokens += [chunk[: m.start()], chunk[m.start() :]]
            continue
        fused = _FUSED.match(chunk)
        tokens += [g for g in fused.groups() if g] if fused else [chunk]
    return tokens


def count_capital_words(text: str) -> int:
    """Tokens written all in capitals ("NASA", "DON'T" counts 2, "A1" counts, "I" counts)."""
    return sum(1 for t in word_tokens(text) if t.isupper())


# -------------------------------------------------------------------------------- language

# Unicode block -> (language, or None when several languages share the script).
_SCRIPTS = [
    (0x0900, 0x097F, "devanagari"), (0x0980, 0x09FF, "bn"), (0x0A00, 0x0A7F, "pa"),
    (0x0A80, 0x0AFF, "gu"), (0x0B00, 0x0B7F, "or"), (0x0B80, 0x0BFF, "ta"),
    (0x0C00, 0x0C7F, "te"), (0x0C80, 0x0CFF, "kn"), (0x0D00, 0x0D7F, "ml"),
    (0x0E00, 0x0E7F, "th"), (0x0E80, 0x0EFF, "lo"), (0x10A0, 0x10FF, "ka"),
    (0x0530, 0x058F, "hy"), (0x0590, 0x05FF, "he"), (0x0370, 0x03FF, "el"),
    (0x0400, 0x04FF, "cyrillic"), (0x0600, 0x06FF, "arabic"), (0xFB50, 0xFDFF, "arabic"),
    (0xFE70, 0xFEFF, "arabic"), (0xAC00, 0xD7AF, "ko"), (0x1100, 0x11FF, "ko"),
    (0x3130, 0x318F, "ko"), (0x3040, 0x30FF, "ja"), (0x4E00, 0x9FFF, "han"),
    (0x3400, 0x4DBF, "han"),
]

# Frequent function words per language, for scripts several languages share.
_STOPWORDS = {
    "en": "the and of to a in is that it for was on are with as be this you not have by or at but i",
    "de": "der die und das ist nicht ein eine zu den von mit sich des auf für im dem auch es ich",
    "fr": "le la les et est des une du pas pour dans qui sur au avec ce il sont je nous vous ne",
    "es": "de la que el en los las y es del un una por con para no se su al lo como más pero muy está",
    "it": "il di che è per una non sono della gli con anche ho nel alla questo le",
    "pt": "de que os as é do da não para com um uma mais são ao também você isso no na em",
    "nl": "de het een en van is dat niet op te zijn met voor er maar ook aan bij",
    "fi": "ja on ei se että hän oli ovat mutta kuin myös tai joka sen tämä niin ole kun",
    "sw": "na ya wa kwa ni za katika la cha kuwa hii au pia lakini sana hiyo watu",
    "vi": "và của là có không được cho những các một người trong này với đã để",
    "pl": "nie na się że do jest to jak po ale tak co od przez dla",
    "tr": "ve bir bu da de için ile çok ne daha olarak gibi ama",
    "id": "dan yang di ini itu dengan untuk tidak dari dalam akan ada juga",
    "sv": "och att det som är en på av för med inte har den jag till",
    "hu": "az és hogy nem is egy van meg de ez ki csak már mint",
    "ru": "и в не на что я с он это как по но из к у же вы за бы",
    "bg": "и на да се е от за в не това са че по като но му ще",
    "uk": "і в не на що з це як та до ти він але є у",
    "hi": "है और के की में से का को हैं यह नहीं भी एक पर लिए था",
    "mr": "आहे आणि या हे की मध्ये आहेत नाही तर ते होते करण्यासाठी त्या व",
    "ne": "छ र को मा पनि गर्न छन् हो यो थियो भने लागि एक",
    "ar": "في من على أن إلى هذا التي الذي عن مع هو كان ما و",
    "fa": "و در به از که این را با است برای آن می یک",
    "ur": "کے ہے میں اور کی کا سے کو ہیں یہ نہیں بھی",
}
_STOPWORD_SETS = {lang: frozenset(words.split()) for lang, words in _STOPWORDS.items()}
_SCRIPT_CANDIDATES = {
    "latin": ("en", "de", "fr", "es", "it", "pt", "nl", "fi", "sw", "vi", "pl", "tr", "id", "sv", "hu"),
    "cyrillic": ("ru", "bg", "uk"),
    "devanagari": ("hi", "mr", "ne"),
    "arabic": ("ar", "fa", "ur"),
}
_VIETNAMESE = set("ăâđêôơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ")


def _script_of(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    o = ord(ch)
    if o < 0x0250:
        return "latin"
    if 0x1E00 <= o <= 0x1EFF:
        return "latin"
    for lo, hi, name in _SCRIPTS:
        if lo <= o <= hi:
            return name
    return unicodedata.name(ch, "?").split()[0].lower()


def _by_stopwords(words: list[str], candidates: tuple[str, ...]) -> str:
    scores = {lang: sum(w in _STOPWORD_SETS[lang] for w in words) for lang in candidates}
    best = max(candidates, key=lambda lang: scores[lang])  # ties keep the earlier language
    return best


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of the text's language, or None when it has no letters."""
    counts: dict[str, int] = {}
    for ch in text:
        script = _script_of(ch)
        if script:
            counts[script] = counts.get(script, 0) + 1
    if not counts:
        return None
    script = max(counts, key=counts.__getitem__)
    if script in ("han", "ja"):
        return "ja" if counts.get("ja") else "zh-cn"
    if script not in _SCRIPT_CANDIDATES:
        return script
    lowered = text.lower()
    words = re.findall(r"[^\W\d_]+", lowered)
    if script == "latin" and sum(ch in _VIETNAMESE for ch in lowered) > 0.03 * counts[script]:
        return "vi"
    if script == "cyrillic" and any(ch in "іїєґ" for ch in lowered):
        return "uk"
    if script == "arabic":
        if any(ch in "ےٹڈڑںھۓ" for ch in text):
            return "ur"
        if any(ch in "پچژگکی" for ch in text) and not any(ch in "يك" for ch in text):
            return "fa"
    if script == "devanagari":
        # words of Devanagari text include combining vowel signs, which \w handles
        words = re.findall(r"[\u0900-\u097F]+", text)
    return _by_stopwords(words, _SCRIPT_CANDIDATES[script])
