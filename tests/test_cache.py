"""The tokenized cache: a second run maps what the first built; anything that changes the tokens
makes a new entry; a damaged entry is rebuilt with a notice, never used. (Hits and misses are
read from the run's data report, not from timings.)"""
import json
import os
import shutil

import numpy as np
import pytest

from data import cache
from tests.test_sources import alpaca, prepare, sharegpt, sources_value, write_jsonl


@pytest.fixture
def files(tmp_path):
    return {"chat": write_jsonl(tmp_path / "chat.jsonl", sharegpt(12)),
            "math": write_jsonl(tmp_path / "math.jsonl", alpaca(10))}


def statuses(data) -> dict[str, str]:
    return {n: r["cache"] for n, r in data.report["sources"].items()}


def rows_equal(a, b) -> bool:
    return all(np.array_equal(a.train[k].numpy(), b.train[k].numpy()) for k in a.train)


def entry(tmp_path, name: str):
    found = [p for p in (tmp_path / "out" / ".cache" / "data").iterdir() if p.name.startswith(f"{name}-")]
    assert len(found) == 1, found
    return found[0]


def test_a_second_run_maps_the_cache_and_gets_the_same_rows(tmp_path, tiny_dir, files):
    first = prepare(tmp_path, tiny_dir, sources_value(files))
    assert statuses(first) == {"chat": "built", "math": "built"}
    again = prepare(tmp_path, tiny_dir, sources_value(files))
    assert statuses(again) == {"chat": "hit", "math": "hit"}
    assert rows_equal(first, again)
    # mixing, holding out and the seed come after the cache: changing them re-uses it
    other = prepare(tmp_path, tiny_dir, sources_value(files, weight={"chat": 1.0, "math": 3.0}),
                    "data.eval_fraction=0.2", "run.seed=3")
    assert statuses(other) == {"chat": "hit", "math": "hit"}


@pytest.mark.parametrize("change", ["template", "max_seq_len", "loss_on", "system"])
def test_changing_what_makes_the_tokens_builds_a_new_entry(tmp_path, tiny_dir, files, change):
    prepare(tmp_path, tiny_dir, sources_value(files))
    overrides = {"template": ["data.template=chatml"], "max_seq_len": ["data.max_seq_len=48"],
                 "loss_on": ["data.loss_on=train_on_all"]}.get(change, [])
    value = sources_value(files, system={"math": "Be exact."}) if change == "system" else sources_value(files)
    data = prepare(tmp_path, tiny_dir, value, *overrides)
    assert statuses(data)["math"] == "built"


def test_a_changed_tokenizer_or_source_file_builds_a_new_entry(tmp_path, tiny_dir, files):
    prepare(tmp_path, tiny_dir, sources_value(files))
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert statuses(prepare(tmp_path, model, sources_value(files))) == {"chat": "built", "math": "built"}
    write_jsonl(files["math"], alpaca(11))  # one more record
    assert statuses(prepare(tmp_path, tiny_dir, sources_value(files))) == {"chat": "hit", "math": "built"}
    before = os.stat(files["chat"]).st_mtime_ns
    size = os.stat(files["chat"]).st_size
    files["chat"].write_text(files["chat"].read_text().replace("Hello", "Hallo"))  # same size, other text
    os.utime(files["chat"], ns=(before, before))  # and the old mtime: only the content hash differs
    assert os.stat(files["chat"]).st_size == size
    assert statuses(prepare(tmp_path, tiny_dir, sources_value(files)))["chat"] == "built"


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing meta", "other version"])
def test_a_damaged_entry_is_rebuilt_with_a_notice_never_used(tmp_path, tiny_dir, files, damage, capsys):
    good = prepare(tmp_path, tiny_dir, sources_value(files))
    folder = entry(tmp_path, "math")
    ids = folder / "input_ids.npy"
    if damage == "flipped byte":
        raw = bytearray(ids.read_bytes())
        raw[-3] ^= 0xFF
        ids.write_bytes(bytes(raw))
    elif damage == "truncated":
        ids.write_bytes(ids.read_bytes()[:-10])
    elif damage == "missing meta":
        (folder / "meta.json").unlink()
    else:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "code_version": cache.CODE_VERSION + 1}))
    capsys.readouterr()
    again = prepare(tmp_path, tiny_dir, sources_value(files))
    assert statuses(again) == {"chat": "hit", "math": "rebuilt"}
    notice = [line for line in capsys.readouterr().out.splitlines() if "data cache:" in line]
    assert len(notice) == 1 and str(folder) in notice[0] and "rebuilding" in notice[0]
    assert rows_equal(good, again)
    assert statuses(prepare(tmp_path, tiny_dir, sources_value(files)))["math"] == "hit"


def test_the_cache_folder_is_an_option(tmp_path, tiny_dir, files):
    where = tmp_path / "shared-cache"
    prepare(tmp_path, tiny_dir, sources_value(files), f"data.cache_dir={where}")
    assert sorted(p.name.split("-")[0] for p in where.iterdir()) == ["chat", "math"]
    data = prepare(tmp_path, tiny_dir, sources_value(files), f"data.cache_dir={where}", "data.cache_hash=full")
    assert statuses(data) == {"chat": "built", "math": "built"}  # the full hash is another key
