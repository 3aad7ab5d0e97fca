"""[[data.sources]]: several files mixed into one training set, by weights or by temperature, with a
report whose numbers add up; bad mixtures are one-line errors naming the source and the key."""
import json
import math
from pathlib import Path

import pytest

from data.chat import chat_for
from model.errors import SFTError
from model.tokenizer import Tokenizer
from training import loop as T
from training.config import load_config, to_toml
from training.data import prepare_data


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca(n: int, tag: str = "a") -> list[dict]:
    return [{"instruction": f"{tag}: what is {i} plus {i}?", "input": "", "output": f"It is {2 * i}, {tag}."}
            for i in range(n)]


def sharegpt(n: int) -> list[dict]:
    return [{"conversations": [{"from": "human", "value": f"Hello number {i}"},
                               {"from": "gpt", "value": f"Hi! You said {i}."},
                               {"from": "human", "value": "Thanks"}, {"from": "gpt", "value": "Welcome."}]}
            for i in range(n)]


def openai(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Name a colour ({i})"},
                          {"role": "assistant", "content": f"Blue, {i} times."}]} for i in range(n)]


@pytest.fixture
def three(tmp_path) -> dict[str, Path]:
    """Three small files in three formats: 30, 20 and 10 conversations."""
    return {"chat": write_jsonl(tmp_path / "chat.jsonl", sharegpt(30)),
            "math": write_jsonl(tmp_path / "math.jsonl", alpaca(20)),
            "colours": write_jsonl(tmp_path / "colours.jsonl", openai(10))}


def sources_value(files: dict[str, Path], **per_source) -> str:
    """A `data.sources=[...]` override (a TOML inline array of tables)."""
    tables = []
    for name, path in files.items():
        extra = "".join(f", {k} = {json.dumps(v[name])}" for k, v in per_source.items() if name in v)
        tables.append(f'{{path = "{path}", name = "{name}"{extra}}}')
    return "data.sources=[" + ", ".join(tables) + "]"


def prepare(tmp_path, model_dir, *overrides):
    cfg = load_config(None, [f"model.path={model_dir}", f"run.out_dir={tmp_path / 'out'}", "data.max_seq_len=64",
                             "data.eval_fraction=0", "data.num_workers=1", *overrides])
    tok = Tokenizer.from_pretrained(model_dir)
    return prepare_data(cfg, chat_for(model_dir, tok, cfg.data.template))


def test_three_source_mixture_from_a_toml_config_trains(tmp_path, tiny_dir, three):
    toml = tmp_path / "mix.toml"
    toml.write_text(f"""
[run]
name = "mix"
out_dir = "{tmp_path / 'runs'}"
threads = 1
[model]
path = "{tiny_dir}"
[data]
max_seq_len = 96
[[data.sources]]
path = "{three['chat']}"
weight = 2.0
system = "Be brief."
[[data.sources]]
path = "{three['math']}"
weight = 1.0
eval_fraction = 0.2
[[data.sources]]
path = "{three['colours']}"
weight = 1.0
[train]
batch_size = 2
max_steps = 3
[eval]
sample_prompts = 1
max_new_tokens = 4
""")
    cfg = load_config(toml)
    assert [s.path for s in cfg.data.sources] == [str(p) for p in three.values()]
    assert load_config_text(tmp_path, to_toml(cfg)) == cfg  # the resolved config writes [[data.sources]] back
    summary = T.train(cfg)
    assert summary["steps"] == 3
    report = json.loads((Path(summary["run_dir"]) / "data_report.json").read_text())
    assert list(report["sources"]) == ["chat", "math", "colours"]
    assert report["sources"]["math"]["held_out"]["conversations"] == 4  # its own eval_fraction
    assert report["sources"]["chat"]["held_out"]["conversations"] == 2  # data.eval_fraction 0.05 of 30


def load_config_text(tmp_path, text):
    p = tmp_path / "resolved.toml"
    p.write_text(text)
    return load_config(p)


def test_sampled_counts_follow_the_weights(tmp_path, tiny_dir, three):
    data = prepare(tmp_path, tiny_dir, sources_value(three, weight={"chat": 1.0, "math": 2.0, "colours": 1.0}))
    mix = {n: r["mixture"] for n, r in data.report["sources"].items()}
    # total = 60 available samples; shares 1/4, 2/4, 1/4
    assert {n: m["samples"] for n, m in mix.items()} == {"chat": 15, "math": 30, "colours": 15}
    assert mix["math"]["passes"] == 1.5 and mix["chat"]["passes"] == 0.5


def test_sampled_counts_follow_the_temperature_formula(tmp_path, tiny_dir, three):
    data = prepare(tmp_path, tiny_dir, sources_value(three), "data.temperature=2.0")
    sizes = {"chat": 30, "math": 20, "colours": 10}
    z = sum(n ** 0.5 for n in sizes.values())
    got = {n: r["mixture"]["samples"] for n, r in data.report["sources"].items()}
    assert sum(got.values()) == 60
    for name, n in sizes.items():  # p_i = n_i^(1/T) / sum_j n_j^(1/T), rounded to whole samples
        assert abs(got[name] - 60 * n ** 0.5 / z) < 1, (name, got)


def test_data_report_numbers_add_up(tmp_path, tiny_dir, three):
    write_jsonl(three["math"], alpaca(20) + [{"instruction": "word " * 60, "output": "ok"}] * 3)  # 3 too long
    data = prepare(tmp_path, tiny_dir, sources_value(three, weight={"chat": 3.0, "math": 1.0, "colours": 1.0},
                                                     eval_fraction={"math": 0.25}))
    report = data.report
    assert report["sources"]["math"]["dropped"]["no_trainable_token"] == 3
    sources = report["sources"].values()
    for r in sources:
        assert r["conversations"] == r["samples"] + sum(r["dropped"].values())  # one sample per conversation here
        assert r["samples"] == r["train"]["samples"] + r["held_out"]["samples"]
        assert r["tokens"] == r["train"]["tokens"] + r["held_out"]["tokens"]
        assert r["trainable_tokens"] == r["train"]["trainable_tokens"] + r["held_out"]["trainable_tokens"]
    mixture = report["mixture"]
    for key in ("samples", "tokens", "trainable_tokens"):
        assert mixture[key] == sum(r["mixture"][key] for r in sources)
    assert math.isclose(sum(r["mixture"]["token_share"] for r in sources), 1.0)
    # the packed rows hold exactly the mixture: every token, and the same trainable count the loop sees
    assert mixture["tokens"] == int((data.train["seq_ids"] >= 0).sum())
    assert mixture["trainable_tokens"] == int((data.train["labels"][:, 1:] >= 0).sum())
    assert report["rows"]["train"] == len(data.train["input_ids"])
    assert report["held_out_tokens"] == int((data.held_out["seq_ids"] >= 0).sum())
    assert len(data.held_out_conversations) == sum(r["held_out"]["conversations"] for r in sources) == 6


def test_one_file_is_a_one_source_mixture_in_its_own_order(tmp_path, tiny_dir, three):
    data = prepare(tmp_path, tiny_dir, f"data.train={three['math']}", "data.eval_fraction=0.1")
    (name, r), = data.report["sources"].items()
    assert name == "math" and r["mixture"]["samples"] == r["train"]["samples"] == 18 and r["mixture"]["passes"] == 1.0
    held = data.held_out_conversations[:2]
    assert len(held) == 2 and all(c[-1]["role"] == "assistant" for c in held)


def test_a_source_system_prompt_reaches_the_conversations_without_one(tmp_path, tiny_dir, three):
    data = prepare(tmp_path, tiny_dir, sources_value({"math": three["math"]}, system={"math": "Be exact."},
                                                     eval_fraction={"math": 0.1}))
    conv = data.held_out_conversations[0]
    assert conv[0] == {"role": "system", "content": "Be exact."}


def error_of(fn) -> str:
    with pytest.raises(SFTError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_a_source_path_that_does_not_exist_is_named(tmp_path, tiny_dir, three):
    files = {**three, "gone": tmp_path / "gone.jsonl"}
    msg = error_of(lambda: prepare(tmp_path, tiny_dir, sources_value(files)))
    assert "data.sources[3].path" in msg and "gone.jsonl" in msg and "not found" in msg


def test_a_weight_of_zero_or_less_is_an_error_naming_the_key(tmp_path, tiny_dir, three):
    for w in (0.0, -1.0):
        msg = error_of(lambda: prepare(tmp_path, tiny_dir, sources_value(three, weight={"chat": 1.0, "math": w,
                                                                                          "colours": 1.0})))
        assert "'data.sources[1].weight' must be > 0" in msg


def test_weights_on_some_sources_only_or_with_a_temperature_are_errors(tmp_path, tiny_dir, three):
    msg = error_of(lambda: prepare(tmp_path, tiny_dir, sources_value(three, weight={"math": 1.0})))
    assert "data.sources[0]" in msg and "no weight" in msg
    msg = error_of(lambda: prepare(tmp_path, tiny_dir, sources_value(three, weight={n: 1.0 for n in three}),
                                   "data.temperature=2"))
    assert "data.temperature" in msg and "weight" in msg


def test_one_file_keys_beside_sources_are_an_error_not_ignored(tmp_path, tiny_dir, three):
    msg = error_of(lambda: prepare(tmp_path, tiny_dir, sources_value(three), "data.max_records=5"))
    assert "data.max_records" in msg and "[[data.sources]]" in msg


def test_two_sources_with_one_name_are_an_error(tmp_path, tiny_dir, three):
    (tmp_path / "sub").mkdir()
    other = write_jsonl(tmp_path / "sub" / "math.jsonl", alpaca(3))
    msg = error_of(lambda: prepare(tmp_path, tiny_dir, f'data.sources=[{{path = "{three["math"]}"}}, '
                                                       f'{{path = "{other}"}}]'))
    assert "data.sources[1]" in msg and "'math'" in msg


def test_a_source_whose_every_record_is_dropped_is_named(tmp_path, tiny_dir, three):
    long = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 200, "output": "ok"}] * 3)
    msg = error_of(lambda: prepare(tmp_path, tiny_dir, sources_value({**three, "long": long})))
    assert "data.sources[3] 'long'" in msg and "long.jsonl" in msg and "3 no trainable token" in msg


def test_mixed_formats_in_one_file_are_an_error_naming_source_and_line(tmp_path, tiny_dir, three):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", alpaca(3) + sharegpt(1) + alpaca(2))
    msg = error_of(lambda: prepare(tmp_path, tiny_dir, sources_value({"chat": three["chat"], "mixed": mixed})))
    assert "data.sources[1] 'mixed'" in msg and "mixed.jsonl:4" in msg and "sharegpt record" in msg


def test_a_source_with_its_own_held_out_file_holds_out_that_file(tmp_path, tiny_dir, three):
    held = write_jsonl(tmp_path / "colours_eval.jsonl", openai(4))
    data = prepare(tmp_path, tiny_dir, sources_value(three, eval={"colours": str(held)}), "data.eval_fraction=0.1")
    colours, chat = data.report["sources"]["colours"], data.report["sources"]["chat"]
    assert colours["held_out"]["path"] == str(held) and colours["held_out"]["conversations"] == 4
    assert colours["train"]["samples"] == 10  # the whole training file trains
    assert chat["held_out"]["conversations"] == 3  # the others: data.eval_fraction of their file
    assert len(data.held_out_conversations) == 3 + 2 + 4
    assert data.held_out_conversations[-1][0]["content"] == "Name a colour (3)"


def test_the_one_file_keeps_its_held_out_file(tmp_path, tiny_dir, three):
    data = prepare(tmp_path, tiny_dir, f"data.train={three['math']}", f"data.eval={three['colours']}")
    (r,) = data.report["sources"].values()
    assert r["train"]["samples"] == 20 and r["held_out"]["conversations"] == 10 and data.n_held_out > 0
