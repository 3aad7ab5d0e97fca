"""Each of the 25 IFEval checkers accepts a response that follows it and rejects one that does not."""
import pytest

from data.constraints import (INSTRUCTION_IDS, check_instruction, check_loose,
                              describe_instruction, loose_variants)
from model.errors import SFTError

EN = "The weather was pleasant today, so we walked to the park and talked about our summer plans."
# (instruction id, kwargs, a response that follows it, a response that does not)
CASES = [
    ("keywords:existence", {"keywords": ["apple", "river"]}, "An Apple fell in the river.", "An apple fell."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "cat and Cat", "one cat"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "one cat", "cat, cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["war"]}, "Peace and the warden.", "No War here."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"}, "zZz", "zz"),
    ("language:response_language", {"language": "de"},
     "Das Wetter war heute sehr schön, und wir sind in den Park gegangen.", EN),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two.", "One. Two. Three."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", "First.\n***\n***\nSecond."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five", "one two"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}, "Intro.\n\n\"Then, go.", "Intro.\n\nSo go."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "At [name] on [date].", "At [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\n\nP.S. bye", "Body. PS bye"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\np. p. s. bye", "Body. P.S. bye"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b", "* a\n* b\n* c"),
    ("detectable_format:constrained_response", {}, "Well. My answer is maybe.", "Maybe."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one* and ** **"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\na\nSection 2\nb", "Section 1\nab"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{'a': 1}"),
    ("detectable_format:title", {}, "<<My Poem>>\nroses", "<< >>\nroses"),
    ("combination:two_responses", {}, "Yes.\n******\nNo.", "Yes.\n******\nYes."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?\"", "Any other questions? Ok"),
    ("startend:quotation", {}, '  "quoted"  ', '"half'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "I DON'T know", "I do not"),
    ("change_case:english_capital", {}, EN.upper(), EN),
    ("change_case:english_lowercase", {}, EN.lower(), EN),
    ("punctuation:no_comma", {}, "No commas here.", "Yes, one."),
]


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_accepts_following_response_and_rejects_the_other(iid, kwargs, good, bad):
    assert check_instruction(iid, kwargs, good) is True
    assert check_instruction(iid, kwargs, bad) is False


def test_every_ifeval_instruction_has_a_passing_and_failing_case():
    assert len(INSTRUCTION_IDS) == 25
    assert {c[0] for c in CASES} == set(INSTRUCTION_IDS)


def test_empty_response_follows_nothing_even_a_negative_constraint():
    assert check_instruction("punctuation:no_comma", {}, "   ") is False


def test_loose_forgives_a_leading_line_and_markdown_stars():
    iid, kw = "startend:quotation", {}
    response = 'Sure, here it is:\n"**quoted**"'
    assert check_instruction(iid, kw, response) is False
    assert check_loose(iid, kw, response) is True
    assert len(loose_variants("a\nb\nc")) == 8


def test_null_kwargs_are_dropped_and_missing_ones_named():
    assert check_instruction("punctuation:no_comma", {"unused": None}, "ok") is True
    with pytest.raises(SFTError, match="num_words"):
        check_instruction("length_constraints:number_words", {"relation": "at least"}, "x")
    with pytest.raises(SFTError, match="unknown instruction"):
        check_instruction("keywords:nope", {}, "x")


def test_repeat_prompt_falls_back_to_the_prompt_argument():
    assert check_instruction("combination:repeat_prompt", {}, "Tell me. Ok.", prompt="Tell me.")


def test_descriptions_state_the_arguments():
    text = describe_instruction("length_constraints:number_words", {"num_words": 50, "relation": "less than"})
    assert text == "Answer with less than 50 words."
    assert "German" in describe_instruction("language:response_language", {"language": "de"})
    for iid, kwargs, _, _ in CASES:
        assert describe_instruction(iid, kwargs)
