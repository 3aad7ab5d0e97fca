"""Quality filters (data/quality.py) keep or reject records with a reason; the command
(data/filter.py) reads a typed config, writes kept + rejects files and a table."""
import json
import math

import pytest

from data import filter as filter_cli
from data.quality import (JudgeFilter, LengthFilter, NearDedup, PerplexityFilter, exact_dedup, judge_filter,
                          length_filter, near_dedup, parse_score, perplexity_filter, prompt_and_response,
                          read_records, response_perplexities)
from model.errors import SFTError

RECS = [
    {"instruction": "Name a fruit.", "input": "", "output": "An apple is a fruit that grows on trees."},
    {"instruction": "name a fruit", "input": "", "output": "An apple is a fruit that grows on trees!"},
    {"instruction": "Write a long essay about rivers.", "input": "", "output": "No."},
    {"instruction": "Explain gravity briefly to a child who asked why things fall down.", "input": "",
     "output": "Gravity is a pull between things; the big Earth pulls you and your ball toward it."},
]


def test_prompt_and_response_read_alpaca_sharegpt_and_openai_records():
    assert prompt_and_response({"instruction": "A", "input": "B", "output": "C"}) == ("A\n\nB", "C")
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert prompt_and_response(share) == ("hi", "hello")
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert prompt_and_response(msgs) == ("q", "a")
    with pytest.raises(SFTError):
        prompt_and_response({"text": "x"})


def test_dedup_filters_give_the_index_they_duplicate():
    kept, rejects = exact_dedup(RECS)
    assert len(kept) == 3 and rejects[0][1] == "exact duplicate of record 0"
    kept, rejects = near_dedup(RECS, NearDedup(threshold=0.5))
    assert len(kept) == 3 and "near duplicate of record 0" in rejects[0][1]


def test_length_filter_names_the_bound_that_failed():
    kept, rejects = length_filter(RECS, LengthFilter(min_response_chars=5, min_ratio=0.1))
    assert [r for r, _ in rejects] == [RECS[2]] and "response has 3 chars" in rejects[0][1]


@pytest.mark.parametrize("text,score", [
    ("Score: 4\nReason: good", 4.0), ("I'd rate it 3/5 overall.", 3.0), ("**Rating**: 5 - great", 5.0),
    ("2", 2.0), ("4.5 out of 5", 4.5), ("It is fine.", None), ("Score: 9", None),
])
def test_parse_score_finds_the_score_in_free_text(text, score):
    assert parse_score(text)[0] == score


class FakeJudge:
    def __init__(self, answers):
        self.answers = answers

    def complete_many(self, chats, max_tokens, temperature):
        return [self.answers.pop(0) for _ in chats]


def test_judge_filter_rejects_low_scores_and_malformed_answers():
    judge = FakeJudge(["Score: 5\nReason: ok", "Score: 2\nReason: wrong", "blah", "4/5"])
    kept, rejects = judge_filter(RECS, judge, JudgeFilter(min_score=3))
    assert kept == [RECS[0], RECS[3]]
    assert "score 2 < 3: wrong" in rejects[0][1] and "malformed" in rejects[1][1]


def test_perplexity_is_lower_for_fluent_text_and_quantiles_drop_the_tail(pico_dir):
    from model import Tokenizer, load_pretrained
    model, tok = load_pretrained(pico_dir).eval(), Tokenizer.from_pretrained(pico_dir)
    recs = [{"instruction": "Tell a story.", "input": "", "output": "Once upon a time there was a little girl who lived in a house."},
            {"instruction": "Tell a story.", "input": "", "output": "zq xv qqj wkz vvb qpx jjq zzk xqw kqz."}]
    ppl = response_perplexities(recs, model, tok, batch_size=2)
    assert all(math.isfinite(p) for p in ppl) and ppl[0] < ppl[1]
    # batching does not change a sample's score
    assert response_perplexities(recs[:1], model, tok, batch_size=1)[0] == pytest.approx(ppl[0], rel=1e-4)
    kept, rejects = perplexity_filter(recs * 2, model, tok, PerplexityFilter(drop_high=0.5))
    assert kept == [recs[0], recs[0]] and "above" in rejects[0][1]


def test_cli_writes_kept_and_rejects_files_and_prints_counts(tmp_path, capsys):
    data = tmp_path / "in.json"
    data.write_text(json.dumps(RECS))
    cfg = tmp_path / "f.toml"
    cfg.write_text(f'input = "{data}"\noutput_dir = "{tmp_path / "out"}"\n'
                   '[[filters]]\ntype = "exact_dedup"\n[[filters]]\ntype = "length"\nmin_response_chars = 5\n')
    assert filter_cli.main(["--config", str(cfg)]) == 0
    out = tmp_path / "out"
    assert len(read_records(out / "kept.jsonl")) == 2
    rejects = read_records(out / "02_length.rejects.jsonl")
    assert rejects[0]["record"] == RECS[2] and "chars" in rejects[0]["reason"]
    assert "02_length" in capsys.readouterr().out
    cfg.write_text(f'input = "{data}"\noutput_dir = "{out}"\n[[filters]]\ntype = "lenght"\n')
    assert filter_cli.main(["--config", str(cfg)]) == 2


def _filter_config(tmp_path, body: str):
    data = tmp_path / "in.json"
    data.write_text(json.dumps(RECS))
    cfg = tmp_path / "f.toml"
    cfg.write_text(f'input = "{data}"\noutput_dir = "{tmp_path / "out"}"\n' + body)
    return cfg


@pytest.mark.parametrize("body,argv,words", [
    ('outptu_dir = "x"\n[[filters]]\ntype = "exact_dedup"\n', [], ["f.toml", "outptu_dir", "did you mean 'output_dir'"]),
    ('[[filters]]\ntype = "near_dedup"\nthreshold = 1.5\n', [], ["f.toml", "filters.threshold", "<= 1"]),
    ('[[filters]]\ntype = "length"\nmin_response_chars = "ten"\n', [], ["f.toml", "filters.min_response_chars", "int"]),
    ('[[filters]]\ntype = "near_dedup"\nkeep = "last"\n', [], ["f.toml", "filters.keep", "first, longest"]),
    ('[[filters]]\ntype = "exact_dedup"\n[[filters]]\ntype = "fuzzy"\n', [], ["f.toml", "'fuzzy'", "near_dedup"]),
    ('[[filters]]\ntype = "near_dedup"\ntreshold = 0.5\n', [], ["f.toml", "treshold", "known: threshold"]),
    ('[[filters]]\ntype = "perplexity"\n', [], ["f.toml", "#1 (perplexity)", "model_dir"]),
    ('[[filters]]\ntype = "judge"\n', [], ["f.toml", "#1 (judge)", "exactly one of model_dir", "neither"]),
    ('[[filters]]\ntype = "exact_dedup"\n', ["teacher.timeout=0"], ["command line", "teacher.timeout", "> 0"]),
    ('[[filters]]\ntype = "exact_dedup"\n', ["output_dri=x"], ["command line", "did you mean 'output_dir'"]),
    ('', [], ["f.toml", "no [[filters]]"]),
])
def test_filter_config_errors_are_one_line_naming_file_and_key(tmp_path, capsys, body, argv, words):
    cfg = _filter_config(tmp_path, body)
    assert filter_cli.main(["--config", str(cfg), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()  # refused before any step ran


def test_filter_overrides_on_the_command_line_replace_file_values(tmp_path):
    cfg = _filter_config(tmp_path, '[[filters]]\ntype = "length"\nmin_response_chars = 5\n')
    other = tmp_path / "elsewhere"
    assert filter_cli.main(["--config", str(cfg), f"output_dir={other}",
                            'filters=[{type = "length", min_response_chars = 50}]']) == 0
    # the file's 5 chars would keep 3; 50 keeps only the gravity answer (the apple ones have 40)
    assert read_records(other / "kept.jsonl") == [RECS[3]]
    assert not (tmp_path / "out").exists()


def test_filter_help_lists_every_filter_type_with_its_options(capsys):
    with pytest.raises(SystemExit):
        filter_cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(f'type = "{k}"' in out for k in ("exact_dedup", "near_dedup", "length", "perplexity", "judge"))
    assert "drop_high" in out and "teacher.base_url" in out
