"""Verifiable instructions: the 25 IFEval checkers and the sentence that states each one.

IFEval (Zhou et al. 2023) asks for things a program can verify: "answer in fewer than 100
words", "wrap the answer in double quotes", "no commas". Each instruction has an id such as
`punctuation:no_comma` and keyword arguments (`{"num_words": 100, "relation": "less than"}`),
exactly as in IFEval's `input_data.jsonl`. This one module serves two users:

* eval scores a model's answers (`check_instruction` strict, `check_loose` loose);
* synthesis states a constraint to a teacher (`describe_instruction`) and keeps only the
  answers that pass the checker (rejection sampling).

Semantics follow the reference scorer, because a number is only comparable if it is counted
the same way (tests/parity measures the agreement). Some of its choices are surprising:
* `relation` is "less than" (strict <) or "at least" (>=);
* keyword frequency counts case-insensitive *substrings* ("cat" is found in "concatenate"),
  while forbidden words match whole words only;
* paragraphs are split on `***` (number_paragraphs) but on blank lines
  (nth_paragraph_first_word);
* an empty (whitespace-only) response follows no instruction;
* a language check passes when the text has no letters at all (nothing to detect).

Loose scoring forgives markdown and framing: an instruction is followed loosely when any of 8
variants passes: the response with or without its first line, its last line or both, each
with or without every `*` removed.
"""
from __future__ import annotations

import json
import re

from data.textutil import count_capital_words, count_sentences, count_words, detect_language
from model.errors import SFTError

LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi",
    "fr": "French", "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian",
    "bn": "Bengali", "uk": "Ukrainian", "th": "Thai", "ur": "Urdu", "ta": "Tamil",
    "te": "Telugu", "bg": "Bulgarian", "ko": "Korean", "pl": "Polish", "he": "Hebrew",
    "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili", "kn": "Kannada",
    "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise SFTError(f"relation must be 'less than' or 'at least', got {relation!r}")


# ------------------------------------------------------------------------------ checkers
# Each takes (response, kwargs) and returns whether the response follows the instruction.

def _keywords_existence(r: str, kw: dict) -> bool:
    return all(re.search(re.escape(k), r, flags=re.IGNORECASE) for k in kw["keywords"])


def _keywords_frequency(r: str, kw: dict) -> bool:
    n = len(re.findall(re.escape(kw["keyword"].strip()), r, flags=re.IGNORECASE))
    return _compare(n, kw["relation"], kw["frequency"])


def _forbidden_words(r: str, kw: dict) -> bool:
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE)
        for w in kw["forbidden_words"]
    )


def _letter_frequency(r: str, kw: dict) -> bool:
    n = r.lower().count(kw["letter"].strip().lower())
    return _compare(n, kw["let_relation"], kw["let_frequency"])


def _response_language(r: str, kw: dict) -> bool:
    lang = detect_language(r)
    return lang is None or lang == kw["language"]


def _number_sentences(r: str, kw: dict) -> bool:
    return _compare(count_sentences(r), kw["relation"], kw["num_sentences"])


def _number_paragraphs(r: str, kw: dict) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", r)
    # an empty part is allowed only before the first or after the last divider
    if any(not p.strip() for p in parts[1:-1]):
        return False
    return sum(1 for p in parts if p.strip()) == kw["num_paragraphs"]


def _number_words(r: str, kw: dict) -> bool:
    return _compare(count_words(r), kw["relation"], kw["num_words"])


def _nth_paragraph_first_word(r: str, kw: dict) -> bool:
    parts = r.split("\n\n")
    n_nonempty = sum(1 for p in parts if p.strip())
    nth = kw["nth_paragraph"]
    # the reference indexes the raw split (empty parts included), so we do too
    if nth > n_nonempty or not parts[nth - 1].strip():
        return False
    word = parts[nth - 1].strip().split()[0].lstrip("'").lstrip('"')
    first = re.match(r"[^.,?!'\"]*", word).group(0).lower()
    return n_nonempty == kw["num_paragraphs"] and first == kw["first_word"].lower()


def _number_placeholders(r: str, kw: dict) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= kw["num_placeholders"]


def _postscript(r: str, kw: dict) -> bool:
    marker = kw["postscript_marker"].strip()
    patterns = {"P.P.S": r"p\.\s?p\.\s?s", "P.S.": r"p\.\s?s\."}
    pattern = patterns.get(marker, re.escape(marker.lower()))
    return re.search(pattern, r.lower()) is not None


def _number_bullet_lists(r: str, kw: dict) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


def _constrained_response(r: str, kw: dict) -> bool:
    return any(option in r for option in CONSTRAINED_OPTIONS)


def _number_highlighted_sections(r: str, kw: dict) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip()]
    return len(single) + len(double) >= kw["num_highlights"]


def _multiple_sections(r: str, kw: dict) -> bool:
    splitter = re.escape(kw["section_spliter"].strip())
    return len(re.findall(r"\s?" + splitter + r"\s?\d+\s?", r)) >= kw["num_sections"]


def _json_format(r: str, kw: dict) -> bool:
    text = r.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):  # applied in turn, as the reference
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _title(r: str, kw: dict) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _two_responses(r: str, kw: dict) -> bool:
    parts = r.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p for p in parts if p.strip()]
    return len(answers) == 2 and answers[0].strip() != answers[1].strip()


def _repeat_prompt(r: str, kw: dict) -> bool:
    return r.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def _end_checker(r: str, kw: dict) -> bool:
    return r.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


def _quotation(r: str, kw: dict) -> bool:
    text = r.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def _capital_word_frequency(r: str, kw: dict) -> bool:
    return _compare(count_capital_words(r), kw["capital_relation"], kw["capital_frequency"])


def _english_capital(r: str, kw: dict) -> bool:
    return r.isupper() and detect_language(r) in (None, "en")


def _english_lowercase(r: str, kw: dict) -> bool:
    return r.islower() and detect_language(r) in (None, "en")


def _no_comma(r: str, kw: dict) -> bool:
    return "," not in r


# id -> (checker, required kwargs, description template)
INSTRUCTIONS = {
    "keywords:existence": (_keywords_existence, ("keywords",),
        "Include keywords {keywords} in the response."),
    "keywords:frequency": (_keywords_frequency, ("keyword", "frequency", "relation"),
        "In your response, the word {keyword} should appear {relation} {frequency} times."),
    "keywords:forbidden_words": (_forbidden_words, ("forbidden_words",),
        "Do not include keywords {forbidden_words} in the response."),
    "keywords:letter_frequency": (_letter_frequency, ("letter", "let_frequency", "let_relation"),
        "In your response, the letter {letter} should appear {let_relation} {let_frequency} times."),
    "language:response_language": (_response_language, ("language",),
        "Your ENTIRE response should be in {language_name} language, no other language is allowed."),
    "length_constraints:number_sentences": (_number_sentences, ("num_sentences", "relation"),
        "Your response should contain {relation} {num_sentences} sentences."),
    "length_constraints:number_paragraphs": (_number_paragraphs, ("num_paragraphs",),
        "There should be {num_paragraphs} paragraphs. Paragraphs are separated with the markdown divider: ***"),
    "length_constraints:number_words": (_number_words, ("num_words", "relation"),
        "Answer with {relation} {num_words} words."),
    "length_constraints:nth_paragraph_first_word": (_nth_paragraph_first_word,
        ("num_paragraphs", "nth_paragraph", "first_word"),
        "There should be {num_paragraphs} paragraphs. Paragraphs and only paragraphs are "
        "separated with each other by two new lines as if it was '\\n\\n' in python. "
        "Paragraph {nth_paragraph} must start with word {first_word}."),
    "detectable_content:number_placeholders": (_number_placeholders, ("num_placeholders",),
        "The response must contain at least {num_placeholders} placeholders represented by "
        "square brackets, such as [address]."),
    "detectable_content:postscript": (_postscript, ("postscript_marker",),
        "At the end of your response, please explicitly add a postscript starting with {postscript_marker}"),
    "detectable_format:number_bullet_lists": (_number_bullet_lists, ("num_bullets",),
        "Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet "
        "points such as:\n* This is point 1. \n* This is point 2"),
    "detectable_format:constrained_response": (_constrained_response, (),
        "Answer with one of the following options: {options}"),
    "detectable_format:number_highlighted_sections": (_number_highlighted_sections, ("num_highlights",),
        "Highlight at least {num_highlights} sections in your answer with markdown, i.e. *highlighted section*."),
    "detectable_format:multiple_sections": (_multiple_sections, ("section_spliter", "num_sections"),
        "Your response must have {num_sections} sections. Mark the beginning of each section "
        "with {section_spliter} X, such as:\n{section_spliter} 1\n[content of section 1]\n"
        "{section_spliter} 2\n[content of section 2]"),
    "detectable_format:json_format": (_json_format, (),
        "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."),
    "detectable_format:title": (_title, (),
        "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."),
    "combination:two_responses": (_two_responses, (),
        "Give two different responses. Responses and only responses should be separated by 6 "
        "asterisk symbols: ******."),
    "combination:repeat_prompt": (_repeat_prompt, ("prompt_to_repeat",),
        "First repeat the request word for word without change, then give your answer (1. do "
        "not say any words or characters before repeating the request; 2. the request you need "
        "to repeat does not include this sentence)"),
    "startend:end_checker": (_end_checker, ("end_phrase",),
        "Finish your response with this exact phrase {end_phrase}. No other words should follow this phrase."),
    "startend:quotation": (_quotation, (),
        "Wrap your entire response with double quotation marks."),
    "change_case:capital_word_frequency": (_capital_word_frequency,
        ("capital_frequency", "capital_relation"),
        "In your response, words with all capital letters should appear {capital_relation} "
        "{capital_frequency} times."),
    "change_case:english_capital": (_english_capital, (),
        "Your entire response should be in English, and in all capital letters."),
    "change_case:english_lowercase": (_english_lowercase, (),
        "Your entire response should be in English, and in all lowercase letters. No capital "
        "letters are allowed."),
    "punctuation:no_comma": (_no_comma, (),
        "In your entire response, refrain from the use of any commas."),
}
INSTRUCTION_IDS: list[str] = list(INSTRUCTIONS)


def _lookup(instruction_id: str, kwargs: dict | None, prompt: str = ""):
    if instruction_id not in INSTRUCTIONS:
        raise SFTError(
            f"unknown instruction id {instruction_id!r}; known ids: {', '.join(INSTRUCTION_IDS)}"
        )
    fn, required, template = INSTRUCTIONS[instruction_id]
    # IFEval files carry null for unused arguments: drop them as the reference does
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None and v != ""}
    if instruction_id == "combination:repeat_prompt" and "prompt_to_repeat" not in kw and prompt:
        kw["prompt_to_repeat"] = prompt
    missing = [k for k in required if k not in kw]
    if missing:
        raise SFTError(f"instruction {instruction_id!r} needs kwargs {missing}, got {sorted(kw)}")
    return fn, kw, template


def check_instruction(instruction_id: str, kwargs: dict | None, response: str, prompt: str = "") -> bool:
    """Strict check: does the raw response follow the instruction? (empty response: False)"""
    fn, kw, _ = _lookup(instruction_id, kwargs, prompt)
    return bool(response.strip()) and fn(response, kw)


def loose_variants(response: str) -> list[str]:
    """The 8 variants loose scoring tries: drop first/last/both lines, with/without `*`."""
    lines = response.split("\n")
    trimmed = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
               "\n".join(lines[1:-1]).strip()]
    return trimmed + [t.replace("*", "") for t in trimmed]


def check_loose(instruction_id: str, kwargs: dict | None, response: str, prompt: str = "") -> bool:
    """Loose check: does any of the 8 variants of the response follow the instruction?"""
    fn, kw, _ = _lookup(instruction_id, kwargs, prompt)
    return any(v.strip() and fn(v, kw) for v in loose_variants(response))


def describe_instruction(instruction_id: str, kwargs: dict | None) -> str:
    """The sentence that states the instruction to a model (IFEval's wording)."""
    _, kw, template = _lookup(instruction_id, kwargs)
    values = dict(kw)
    for key in ("keywords", "forbidden_words"):
        if key in values:
            values[key] = ", ".join(sorted(values[key]))
    values["language_name"] = LANGUAGE_NAMES.get(kw.get("language", ""), kw.get("language", ""))
    values["options"] = "(" + ", ".join(f"'{o}'" for o in CONSTRAINED_OPTIONS) + ")"
    return template.format(**values)
