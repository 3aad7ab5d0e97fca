"""Synthesis loops with a scripted teacher: parsing, novelty, elimination, rejection sampling, resume."""
import json

import pytest

from data import synth
from data.constraints import check_instruction
from data.synth import (ConstrainedOptions, SelfInstructOptions, constrained_responses, eliminate,
                        evol_instruct, parse_task, read_jsonl, read_seed_tasks, rouge_l, self_instruct)
from data.teacher import Completion


class ScriptedTeacher:
    """Answers from a function of the last user message; counts calls like the real Teacher."""

    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def complete(self, messages, max_tokens=256, temperature=0.0):
        self.calls += 1
        return self.answer(messages[-1]["content"])

    def complete_many(self, batch, max_tokens=256, temperature=0.0):
        return [self.complete(m, max_tokens, temperature) for m in batch]

    def completions(self, batch, max_tokens=256, temperature=0.0):
        return [Completion(t) for t in self.complete_many(batch, max_tokens, temperature)]


def test_rouge_l_is_the_lcs_f1_of_words():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)  # LCS "a c": P = R = 2/4
    assert rouge_l("", "x") == 0.0


def test_parse_task_reads_instruction_input_output_and_rejects_noise():
    t = parse_task(" List three colours.\nInput: <noinput>\nOutput: red, green, blue\nTask 5:\nInstruction: x")
    assert t == {"instruction": "List three colours.", "input": "", "output": "red, green, blue"}
    assert parse_task("once upon a time there was a dog") is None


def test_self_instruct_keeps_novel_tasks_counts_duplicates_and_malformed_and_resumes(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"instruction": f"Seed task number {w}.", "instances": [{"input": "", "output": "o"}]})
                               for w in ("one", "two", "three")))
    answers = iter([" Translate the word cat into French.\nInput: <noinput>\nOutput: chat",
                    " Translate the word cat into French!\nInput:\nOutput: chat",   # not novel
                    "gibberish without fields",                                       # malformed
                    " Summarise the story of Hamlet in two sentences.\nInput: <noinput>\nOutput: A prince..."])
    teacher = ScriptedTeacher(lambda _: next(answers))
    out = tmp_path / "si.jsonl"
    opts = SelfInstructOptions(num_instructions=2, batch_size=1, max_rounds=10)
    stats = self_instruct(teacher, read_seed_tasks(seeds), str(out), opts)
    assert stats["accepted"] == 2 and stats["not_novel"] == 1 and stats["malformed"] == 1
    assert [r["instruction"] for r in read_jsonl(out)][0] == "Translate the word cat into French."
    again = self_instruct(teacher, read_seed_tasks(seeds), str(out), opts)
    assert again["resumed"] == 2 and again["asked"] == 0


def test_evol_elimination_rules():
    assert eliminate("Name a fruit.", "#Rewritten Prompt#: Name a fruit.", "Apple") == "copied the rewriting prompt"
    assert eliminate("Name a fruit.", "Name a fruit.", "Apple") == "no information gain over the parent"
    assert "apology" in eliminate("Name a fruit.", "Name a tropical fruit grown in Asia.", "Sorry, I can't.")
    assert "stop words" in eliminate("Name a fruit.", "Name a tropical fruit grown in Asia.", "the, a, of!")
    assert eliminate("Name a fruit.", "Name a tropical fruit grown in Asia.", "Mango.") is None


def test_evol_instruct_writes_accepted_rows_with_method_and_parent(tmp_path):
    def answer(prompt):
        return "Name a tropical fruit grown in Asia and say why." if "#Given Prompt#" in prompt else "Mango, sweet."
    recs = [{"instruction": "Name a fruit.", "input": ""}, {"instruction": "Name a tree.", "input": ""}]
    stats = evol_instruct(ScriptedTeacher(answer), recs, str(tmp_path / "e.jsonl"))
    rows = read_jsonl(tmp_path / "e.jsonl")
    assert stats["accepted"] == 2 and rows[0]["parent_index"] == 0 and rows[0]["evol_method"]


def test_constrained_keeps_only_answers_that_pass_their_checker(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "sample_constraint", lambda rng, inst: ("punctuation:no_comma", {}))
    answers = iter(["Yes, sure.", "Yes sure.", "a, b", "c, d"])
    recs = [{"instruction": "Say yes.", "input": ""}, {"instruction": "List two.", "input": ""}]
    out = tmp_path / "c.jsonl"
    stats = constrained_responses(ScriptedTeacher(lambda _: next(answers)), recs, str(out), ConstrainedOptions(attempts=2))
    rows = read_jsonl(out)
    assert stats == {"resumed": 0, "accepted": 1, "no_passing_answer": 1, "answers_rejected": 3}
    assert rows[0]["output"] == "Yes sure." and rows[0]["attempts"] == 2
    assert "refrain from the use of any commas" in rows[0]["instruction"]
    assert all(check_instruction(i, k, rows[0]["output"]) for i, k in zip(rows[0]["instruction_id_list"], rows[0]["kwargs"]))


def test_sampled_constraints_are_checkable():
    import random
    rng = random.Random(0)
    for _ in range(200):
        iid, kw = synth.sample_constraint(rng, "Write a poem about the ocean waves.")
        check_instruction(iid, kw, "some answer")  # raises if kwargs were incomplete


def test_an_answer_with_reasoning_keeps_it_as_a_think_block_that_loaders_split_back(tmp_path):
    from data.formats import load_conversations

    class ThinkingTeacher(ScriptedTeacher):
        def completions(self, batch, max_tokens=256, temperature=0.0):
            return [Completion(t, reasoning="Mango is tropical.") for t in self.complete_many(batch)]

    def answer(prompt):
        return "Name a tropical fruit grown in Asia and say why." if "#Given Prompt#" in prompt else "Mango, sweet."
    out = tmp_path / "e.jsonl"
    evol_instruct(ThinkingTeacher(answer), [{"instruction": "Name a fruit.", "input": ""}], str(out))
    conv = load_conversations(out)[0]
    assert conv[-1] == {"role": "assistant", "content": "Mango, sweet.", "reasoning": "Mango is tropical."}


def _synth_config(tmp_path, body: str):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Seed task one.", "instances": [{"input": "", "output": "o"}]}))
    cfg = tmp_path / "s.toml"
    cfg.write_text(body.replace("SEEDS", str(seeds)).replace("OUT", str(tmp_path / "out")))
    return cfg


GOOD_HEAD = 'output_dir = "OUT"\n[teacher]\nbase_url = "http://127.0.0.1:9/v1"\n'


@pytest.mark.parametrize("body,argv,words", [
    (GOOD_HEAD + '[self_instruct]\nseed_path = "SEEDS"\nnum_instruction = 3\n', [],
     ["s.toml", "'self_instruct.num_instruction'", "did you mean 'self_instruct.num_instructions'"]),
    (GOOD_HEAD + '[self_instruct]\nseed_path = "SEEDS"\nrouge_threshold = 1.5\n', [],
     ["s.toml", "self_instruct.rouge_threshold", "<= 1"]),
    (GOOD_HEAD + '[evol]\ninput = "x.json"\nlimit = "four"\n', [], ["s.toml", "evol.limit", "int"]),
    (GOOD_HEAD + '[evol]\ninput = "x.json"\nmethods = ["deeper"]\n', [], ["s.toml", "evol.methods", "'deeper'", "deepen"]),
    (GOOD_HEAD + '[evol]\nlimit = 4\n', [], ["s.toml", "[evol] sets options but no input", "evol.input"]),
    (GOOD_HEAD, [], ["s.toml", "nothing to do", "answers.input"]),
    ('output_dir = "OUT"\n[teacher]\nmodel_dir = "m"\nbase_url = "http://h/v1"\n[self_instruct]\nseed_path = "SEEDS"\n',
     [], ["s.toml", "exactly one of model_dir", "both"]),
    (GOOD_HEAD + '[self_instruct]\nseed_path = "SEEDS"\n', ["teacher.max_retries=-1"],
     ["command line", "teacher.max_retries", ">= 0"]),
    (GOOD_HEAD + '[self_instruct]\nseed_path = "SEEDS"\n', ["teacher.template=qwen4"],
     ["command line", "teacher.template", "did you mean 'qwen3'"]),
    (GOOD_HEAD + '[self_instruct]\nseed_path = "SEEDS"\n[bogus]\nx = 1\n', [], ["s.toml", "unknown option 'bogus.x'"]),
    ('[teacher]\nbase_url = "http://h/v1"\n[self_instruct]\nseed_path = "SEEDS"\n', [], ["s.toml", "output_dir"]),
])
def test_synth_config_errors_are_one_line_naming_file_and_key(tmp_path, capsys, body, argv, words):
    cfg = _synth_config(tmp_path, body)
    assert synth.main(["--config", str(cfg), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_synth_help_lists_every_loop_option_with_its_range(capsys):
    with pytest.raises(SystemExit):
        synth.main(["--help"])
    out = capsys.readouterr().out
    assert "self_instruct.rouge_threshold" in out and "(> 0 and <= 1)" in out
    assert "answers.tools" in out and "teacher.backoff" in out
