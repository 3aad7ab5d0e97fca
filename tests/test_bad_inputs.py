"""Bad input as a specification: every mistake a user can make ends in ONE clear message.

Each row of the tables below is one bad input written as data: a name, how to build it in a
temporary folder, what to feed it to, and the words the message must contain -- the file, and
the line or key where the mistake is. A library function must raise `SFTError` (one line, not a
wall of text, never a KeyError or a UnicodeDecodeError from deep inside). A command-line tool
must print that message once, exit with status 2, show no traceback (unless `--debug`), and
leave no partial output behind: the output folder does not appear, or is byte-for-byte what
it was.

The cases here call the library directly (fast); tests/test_bad_inputs_cli.py runs a subset
through the real commands.

Unreadable files: the tests run as root in CI, and root ignores `chmod 000`, so these cases make
`open` raise PermissionError for one path instead (monkeypatch).
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import io
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from data.chat import chat_for
from data.formats import load_conversations
from evaluation.ifeval import load_ifeval
from evaluation.judge import load_questions
from evaluation.mc import load_mc_items
from lora import load_adapter
from model.checkpoint import load_pretrained
from model.errors import SFTError
from model.safetensors import SafeFile, load_file, load_sharded, save_file
from model.tokenizer import Tokenizer
from training.config import load_config
from training.data import prepare_data

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
OPENAI = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}

# ----------------------------------------------------------------------------- fixtures




@dataclasses.dataclass
class Ctx:
    """What a case's `make` gets: a scratch folder, the good tiny model and adapter, monkeypatch."""
    tmp: Path
    tiny: Path
    adapter: Path
    mp: pytest.MonkeyPatch


@pytest.fixture
def ctx(tmp_path, tiny_dir, adapter_dir, monkeypatch) -> Ctx:
    return Ctx(tmp_path, tiny_dir, adapter_dir, monkeypatch)

# ----------------------------------------------------------------------------- builders


def put(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def jsonl(*records: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def st_bytes(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file by hand: [u64 header length][JSON header][data]; `length` may lie."""
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


W22 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}  # one good 2x2 fp32 tensor


def copy_model(c: Ctx, edit: Callable[[Path], None] | None = None) -> Path:
    folder = c.tmp / "model_dir"
    shutil.copytree(c.tiny, folder)
    if edit:
        edit(folder)
    return folder


def edit_config(**changes) -> Callable[[Path], None]:
    """Set (or with value None, delete) keys of config.json."""
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        for k, v in changes.items():
            cfg.pop(k) if v is None else cfg.__setitem__(k, v)
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def edit_weights(fn: Callable[[dict], dict], name: str = "model.safetensors") -> Callable[[Path], None]:
    """Rewrite a safetensors file of the folder through fn(tensors) -> tensors."""
    def edit(folder: Path) -> None:
        tensors = {k: v.clone() for k, v in load_file(folder / name).items()}
        save_file(fn(tensors), folder / name)
    return edit


def edit_json(name: str, **changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        d = json.loads((folder / name).read_text())
        d.update(changes)
        (folder / name).write_text(json.dumps(d))
    return edit


def copy_adapter(c: Ctx, edit: Callable[[Path], None] | None = None) -> Path:
    folder = c.tmp / "adapter_dir"
    shutil.copytree(c.adapter, folder)
    if edit:
        edit(folder)
    return folder


def deny(c: Ctx, path: Path) -> Path:
    """Make opening `path` raise PermissionError, as chmod 000 would for a non-root user."""
    real_open, target = builtins.open, os.path.abspath(path)

    def guarded(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)
    c.mp.setattr(builtins, "open", guarded)
    c.mp.setattr(io, "open", guarded)  # pathlib opens through io.open
    return path


class Exploit:
    """Unpickling this would run code; weights_only=True must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def write_pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Exploit()}, folder / "pytorch_model.bin")


def weights_dtype(folder: Path) -> None:
    edit_weights(lambda t: {**t, "model.norm.weight": t["model.norm.weight"].to(torch.int32)})(folder)


# ----------------------------------------------------------------------------- library cases


@dataclasses.dataclass
class Case:
    name: str
    make: Callable[[Ctx], Any]           # builds the bad input, returns what to feed
    feed: Callable[[Any], Any]           # the library call that must raise SFTError
    expect: tuple[str, ...]              # words the message must contain (file, line/key)


def data_case(name, content, expect, fname="data.jsonl", **opts) -> Case:
    return Case(name, lambda c: put(c.tmp, fname, content),
                lambda p: load_conversations(p, **opts), (fname, *expect))


def st_case(name, content, expect) -> Case:
    return Case(name, lambda c: put(c.tmp, "weights.safetensors", content), SafeFile,
                ("weights.safetensors", *expect))


def model_case(name, edit, expect) -> Case:
    return Case(name, lambda c: copy_model(c, edit), load_pretrained, ("model_dir", *expect))


def tok_case(name, edit, expect) -> Case:
    return Case(name, lambda c: copy_model(c, edit), Tokenizer.from_pretrained, ("model_dir", *expect))


def cfg_case(name, toml, overrides, expect) -> Case:
    def make(c):
        return (put(c.tmp, "run.toml", toml) if toml is not None else None), overrides
    return Case(name, make, lambda a: load_config(*a), expect)


def adapter_case(name, edit, expect) -> Case:
    def make(c):
        return load_pretrained(c.tiny), copy_adapter(c, edit)
    return Case(name, make, lambda a: load_adapter(*a), ("adapter_dir", *expect))


def _rm(name):
    return lambda folder: (folder / name).unlink()


def _two_users(c):
    return put(c.tmp, "data.jsonl", jsonl(OPENAI, {"messages": [{"role": "user", "content": "a"},
                                                              {"role": "user", "content": "b"},
                                                              {"role": "assistant", "content": "c"}]}))


def _sharded(missing: bool):
    def edit(folder: Path) -> None:
        t = load_file(folder / "model.safetensors")
        keys = sorted(t)
        save_file({k: t[k].clone() for k in keys[:3]}, folder / "a.safetensors")
        save_file({k: t[k].clone() for k in keys[3:]}, folder / "b.safetensors")
        (folder / "model.safetensors").unlink()
        wm = {k: "a.safetensors" if i < 3 else "b.safetensors" for i, k in enumerate(keys)}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        if missing:
            (folder / "b.safetensors").unlink()
    return edit


DATA_CASES = [
    data_case("jsonl_malformed_line", jsonl(GOOD, GOOD, '{"instruction": "x", "output": '), (":3", "not valid JSON")),
    data_case("json_array_malformed", json.dumps([GOOD, GOOD], indent=1)[:-3], ("data.json:", "not valid JSON"),
              fname="data.json"),
    data_case("jsonl_line_not_an_object", jsonl(GOOD, [1, 2]), (":2", "JSON object")),
    data_case("json_record_not_an_object", json.dumps([GOOD, "text"]), ("record 1", "JSON object"), fname="data.json"),
    data_case("unknown_field_names", jsonl({"prompt": "a", "completion": "b"}), (":1", "format")),
    data_case("alpaca_missing_output", jsonl(GOOD, {"instruction": "a", "response": "b"}), (":2", "'output'"),
              format="alpaca"),
    data_case("alpaca_output_not_a_string", jsonl({"instruction": "a", "output": 5}), (":1", "'output'")),
    data_case("alpaca_bad_history", jsonl({"instruction": "a", "output": "b", "history": ["q"]}),
              (":1", "history")),
    data_case("openai_unknown_role", jsonl({"messages": [{"role": "user", "content": "a"},
                                                         {"role": "bot", "content": "b"}]}), (":1", "message 1")),
    data_case("openai_content_not_string", jsonl({"messages": [{"role": "user", "content": ["a"]},
                                                               {"role": "assistant", "content": "b"}]}),
              (":1", "message 0", "content")),
    data_case("sharegpt_unknown_speaker", jsonl({"conversations": [{"from": "human", "value": "a"},
                                                                   {"from": "robot", "value": "b"}]}),
              (":1", "turn 1", "robot")),
    data_case("sharegpt_conversations_not_a_list", jsonl({"conversations": "hi"}), (":1", "conversations")),
    data_case("empty_conversation", jsonl(OPENAI, {"messages": []}), (":2", "assistant")),
    data_case("conversation_of_one_user_turn", jsonl({"messages": [{"role": "user", "content": "a"}]}),
              (":1", "assistant")),
    data_case("conversation_ends_with_two_user_turns",
              jsonl({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}),
              (":1",)),
    Case("roles_out_of_order", _two_users, load_conversations, ("data.jsonl:2:", "message 1", "role")),
    data_case("oasst_unknown_parent", jsonl({"message_id": "a", "parent_id": None, "role": "prompter", "text": "q"},
                                            {"message_id": "b", "parent_id": "zz", "role": "assistant", "text": "r"}),
              (":2", "parent_id")),
    data_case("huge_malformed_line", jsonl(GOOD, "{" + "x" * 3_000_000), (":2", "not valid JSON")),
    data_case("latin1_bytes", jsonl(GOOD).encode() + '{"instruction": "café", "output": "x"}\n'.encode("latin-1"),
              (":2", "UTF-8")),
    data_case("utf16_with_bom", jsonl(GOOD).encode("utf-16"), (":1", "UTF-8")),
    Case("data_file_is_a_directory", lambda c: (c.tmp / "data.jsonl").mkdir() or c.tmp / "data.jsonl",
         load_conversations, ("data.jsonl", "directory")),
    Case("data_file_missing", lambda c: c.tmp / "data.jsonl", load_conversations, ("data.jsonl", "not found")),
    Case("data_file_unreadable", lambda c: deny(c, put(c.tmp, "data.jsonl", jsonl(GOOD))), load_conversations,
         ("data.jsonl", "ermission denied")),
]

SAFETENSORS_CASES = [
    st_case("shorter_than_its_length_field", b"\x01\x02\x03", ("truncated",)),
    st_case("header_length_larger_than_file", st_bytes({"w": W22}, bytes(16), length=10_000),
            ("10000", "larger than the file")),
    st_case("header_length_absurd", st_bytes({"w": W22}, bytes(16), length=2**62), ("cap",)),
    st_case("header_not_json", struct.pack("<Q", 6) + b"{nope}" + bytes(16), ("not valid JSON",)),
    st_case("data_truncated", st_bytes({"w": W22}, bytes(10)), ("'w'", "data_offsets")),
    st_case("offsets_out_of_range", st_bytes({"w": {**W22, "data_offsets": [0, 1 << 40]}}, bytes(16)),
            ("'w'", "out of range")),
    st_case("offsets_overlap", st_bytes({"a": W22, "b": W22}, bytes(16)), ("overlaps",)),
    st_case("offsets_leave_a_gap", st_bytes({"w": {**W22, "data_offsets": [4, 20]}}, bytes(20)), ("gap",)),
    st_case("unknown_dtype", st_bytes({"w": {**W22, "dtype": "Q4"}}, bytes(16)), ("'w'", "unknown dtype 'Q4'")),
    st_case("shape_times_itemsize_lies", st_bytes({"w": {**W22, "shape": [3, 3]}}, bytes(16)), ("'w'", "36 bytes")),
    st_case("negative_shape", st_bytes({"w": {**W22, "shape": [-2, -2]}}, bytes(16)), ("'w'", "shape")),
    st_case("entry_without_dtype", st_bytes({"w": {"shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16)),
            ("'w'", "dtype")),
    Case("sharded_index_names_missing_shard", lambda c: copy_model(c, _sharded(missing=True)), load_sharded,
         ("model.safetensors.index.json", "b.safetensors", "missing")),
    Case("sharded_index_not_json", lambda c: copy_model(c, lambda f: _sharded(False)(f) or put(
        f, "model.safetensors.index.json", '{"weight_map": ')), load_sharded, ("model.safetensors.index.json",)),
]

MODEL_CASES = [
    model_case("config_json_missing", _rm("config.json"), ("config.json", "missing")),
    model_case("config_json_invalid", lambda f: put(f, "config.json", '{"hidden_size": 32,\n "vocab_size": }'),
               ("config.json:2:",)),
    model_case("config_key_missing", edit_config(hidden_size=None), ("config.json", "'hidden_size'")),
    model_case("config_value_wrong_type", edit_config(num_hidden_layers="two"), ("config.json", "num_hidden_layers")),
    model_case("config_size_zero", edit_config(hidden_size=0), ("config.json", "hidden_size")),
    model_case("config_size_negative", edit_config(intermediate_size=-64), ("config.json", "intermediate_size")),
    model_case("config_heads_not_divisible", edit_config(num_key_value_heads=3),
               ("config.json", "num_key_value_heads")),
    model_case("config_disagrees_with_weights", edit_config(intermediate_size=80),
               ("model.safetensors", "mlp", "shape")),
    model_case("tensor_missing", edit_weights(lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up" not in k}),
               ("layers.1.mlp.up_proj",)),
    model_case("tensor_unexpected", edit_weights(lambda t: {**t, "model.layers.9.extra.weight": torch.ones(2)}),
               ("model.safetensors", "model.layers.9.extra.weight")),
    model_case("tensor_shape_mismatch", edit_weights(lambda t: {**t, "model.norm.weight": torch.ones(31)}),
               ("model.safetensors", "model.norm.weight", "(31,)")),
    model_case("tensor_wrong_dtype", weights_dtype, ("model.safetensors", "model.norm.weight", "dtype")),
    model_case("no_weights_file", _rm("model.safetensors"), ("no weights",)),
    model_case("pickle_weights_refused", write_pickle_only, ("pytorch_model.bin", "weights_only")),
    model_case("weights_truncated",
               lambda f: put(f, "model.safetensors", (f / "model.safetensors").read_bytes()[:5000]),
               ("model.safetensors",)),
]

TOKENIZER_CASES = [
    tok_case("tokenizer_model_missing", _rm("tokenizer.model"), ("tokenizer.model", "missing")),
    tok_case("tokenizer_model_garbage", lambda f: put(f, "tokenizer.model", b"\x00garbage" * 10),
             ("tokenizer.model", "SentencePiece")),
    tok_case("tokenizer_config_invalid_json", lambda f: put(f, "tokenizer_config.json", '{\n"legacy": fals}'),
             ("tokenizer_config.json:2:",)),
]

CONFIG_CASES = [
    cfg_case("toml_unknown_key", "[optim]\nweight_decy = 0.1\n", [],
             ("run.toml", "optim.weight_decy", "optim.weight_decay")),
    cfg_case("toml_key_named_like_another_tool", "[train]\nlearning_rate = 1e-3\n", [], ("run.toml", "optim.lr")),
    cfg_case("toml_unknown_section", "[optimizer]\nlr = 1e-3\n", [], ("run.toml", "optimizer.lr")),
    cfg_case("toml_bad_syntax", "[optim]\nlr = = 3\n", [], ("run.toml", "line 2")),
    cfg_case("toml_wrong_type", '[train]\nbatch_size = "8"\n', [], ("run.toml", "train.batch_size", "int")),
    cfg_case("toml_not_utf8", b"[run]\nname = \"caf\xe9\"\n", [], ("run.toml", "UTF-8")),
    cfg_case("override_wrong_type", None, ["train.batch_size=eight"], ("command line", "train.batch_size")),
    cfg_case("override_bool_wrong_type", None, ["run.resume=yes"], ("command line", "run.resume")),
    cfg_case("override_without_equals", None, ["optim.lr"], ("command line", "optim.lr")),
    cfg_case("override_unknown_key", None, ["optim.lr_max=1"], ("command line", "optim.lr_max")),
    cfg_case("override_bad_choice", None, ["model.finetune=lorra"], ("model.finetune", "lora")),
    cfg_case("lr_zero", None, ["optim.lr=0"], ("optim.lr",)),
    cfg_case("lr_negative", "[optim]\nlr = -1e-4\n", [], ("optim.lr",)),
    cfg_case("batch_size_zero", None, ["train.batch_size=0"], ("train.batch_size",)),
    cfg_case("grad_accum_negative", None, ["train.grad_accum=-2"], ("train.grad_accum",)),
    cfg_case("max_seq_len_zero", None, ["data.max_seq_len=0"], ("data.max_seq_len",)),
    cfg_case("max_steps_negative", None, ["train.max_steps=-5"], ("train.max_steps",)),
    cfg_case("log_every_zero", None, ["train.log_every=0"], ("train.log_every",)),
    cfg_case("warmup_negative", None, ["optim.warmup_steps=-1"], ("optim.warmup_steps",)),
    cfg_case("lora_rank_zero", None, ["lora.r=0"], ("lora.r",)),
    cfg_case("eval_fraction_above_one", None, ["data.eval_fraction=1.5"], ("data.eval_fraction",)),
    Case("config_file_missing", lambda c: c.tmp / "run.toml", load_config, ("run.toml", "not found")),
    Case("config_file_is_a_directory", lambda c: (c.tmp / "run.toml").mkdir() or c.tmp / "run.toml", load_config,
         ("run.toml",)),
    Case("config_file_unreadable", lambda c: deny(c, put(c.tmp, "run.toml", "[optim]\nlr = 1e-3\n")), load_config,
         ("run.toml", "ermission denied")),
]

ADAPTER_CASES = [
    adapter_case("adapter_config_missing", _rm("adapter_config.json"), ("adapter_config.json", "missing")),
    adapter_case("adapter_config_invalid_json", lambda f: put(f, "adapter_config.json", '{"r": 4,\n'),
                 ("adapter_config.json:2:", "not valid JSON")),
    adapter_case("adapter_config_key_missing", lambda f: put(f, "adapter_config.json", json.dumps({"lora_alpha": 8})),
                 ("adapter_config.json", "'r'")),
    adapter_case("adapter_rank_zero", edit_json("adapter_config.json", r=0), ("adapter_config.json", "r")),
    adapter_case("adapter_rank_disagrees_with_weights", edit_json("adapter_config.json", r=2),
                 ("adapter_model.safetensors", "lora_A", "shape")),
    adapter_case("adapter_weights_missing", _rm("adapter_model.safetensors"), ("adapter_model.safetensors", "missing")),
    adapter_case("adapter_targets_disagree_with_weights", edit_json("adapter_config.json", target_modules=["q_proj"]),
                 ("adapter_model.safetensors", "v_proj")),
    adapter_case("adapter_tensor_dropped",
                 edit_weights(lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.q_proj.lora_B" not in k},
                              "adapter_model.safetensors"), ("adapter_model.safetensors", "missing")),
    adapter_case("adapter_weights_truncated", lambda f: put(f, "adapter_model.safetensors", b"\x10" + bytes(7)),
                 ("adapter_model.safetensors",)),
]

IFEVAL = {"key": 1, "prompt": "Say hi.", "instruction_id_list": [], "kwargs": []}
MC = {"question": "2+2?", "choices": ["3", "4"], "answer_index": 1}
EVAL_DATA_CASES = [
    Case("ifeval_latin1_line",
         lambda c: put(c.tmp, "ifeval.jsonl", jsonl(IFEVAL).encode() + b'{"prompt": "caf\xe9"}\n'),
         load_ifeval, ("ifeval.jsonl", "2", "UTF-8")),
    Case("ifeval_missing_key", lambda c: put(c.tmp, "ifeval.jsonl", jsonl(IFEVAL, {"prompt": "x"})), load_ifeval,
         ("ifeval.jsonl", "2", "instruction_id_list")),
    Case("ifeval_kwargs_not_aligned", lambda c: put(c.tmp, "ifeval.jsonl", jsonl({**IFEVAL, "kwargs": [{}]})),
         load_ifeval, ("ifeval.jsonl", "1", "kwargs")),
    Case("judge_line_not_an_object", lambda c: put(c.tmp, "questions.jsonl", jsonl({"turns": ["hi"]}, ["hi"])),
         load_questions, ("questions.jsonl", "2")),
    Case("mc_answer_index_not_a_number", lambda c: put(c.tmp, "mc.jsonl", jsonl(MC, {**MC, "answer_index": "B"})),
         load_mc_items, ("mc.jsonl", "2", "answer_index")),
    Case("mc_answer_index_out_of_range", lambda c: put(c.tmp, "mc.jsonl", jsonl({**MC, "answer_index": 5})),
         load_mc_items, ("mc.jsonl", "1", "answer_index")),
]

def train_data(content: str, *overrides: str):
    """make(): (config, chat) for training.data.prepare_data on a data file holding `content`."""
    def make(c):
        cfg = load_config(None, [f"data.train={put(c.tmp, 'data.jsonl', content)}", *overrides])
        return cfg, chat_for(c.tiny, Tokenizer.from_pretrained(c.tiny), "alpaca")
    return make


TRAIN_DATA_CASES = [
    Case("train_data_file_empty", train_data("\n\n"), lambda a: prepare_data(*a),
         ("data.jsonl", "no conversations")),
    Case("train_data_all_held_out", train_data(jsonl(GOOD), "data.eval_fraction=0.5"),
         lambda a: prepare_data(*a),
         ("data.jsonl", "data.eval_fraction")),
]

CASES = (DATA_CASES + TRAIN_DATA_CASES + EVAL_DATA_CASES + SAFETENSORS_CASES + MODEL_CASES
         + TOKENIZER_CASES + CONFIG_CASES + ADAPTER_CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_raises_one_message_naming_file_and_place(case, ctx):
    arg = case.make(ctx)
    with pytest.raises(SFTError) as err:
        case.feed(arg)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 600, f"not one short line: {msg[:700]!r}"
    for part in case.expect:
        assert part in msg, f"{part!r} not in: {msg}"


def test_no_file_is_ever_unpickled_without_weights_only():
    """A pickle runs code when loaded: every torch.load in the project passes weights_only=True,
    and nothing imports pickle (safetensors and JSON carry everything else)."""
    sources = [p for d in ("model", "data", "training", "evaluation", "bench") for p in (ROOT / d).glob("*.py")]
    sources += [ROOT / f for f in ("train.py", "eval.py", "lora.py")]
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle"} & set(names), f"{path}:{node.lineno} imports pickle"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" \
                    and getattr(node.func.value, "id", "") == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert ok, f"{path}:{node.lineno}: torch.load without weights_only=True"

