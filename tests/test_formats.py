"""data.formats: every supported dataset file becomes conversations of {role, content}."""
import json

import pytest

from data.formats import detect_format, load_conversations
from model.errors import SFTError


def roles(conv):
    return [m["role"] for m in conv]


def assert_alternating(conv):
    body = conv[1:] if conv[0]["role"] == "system" else conv
    assert roles(body) == ["user", "assistant"] * (len(body) // 2)


def write(tmp_path, name, records, jsonl=False):
    path = tmp_path / name
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("rel, count", [
    ("data/llamafactory_alpaca_en_demo.json", 999),
    ("data/gsm8k_train_alpaca_format.json", 7473),
    ("data/fastchat_dummy_conversation.json", 500),
    ("data/alpaca_seed_tasks.jsonl", 175),
])
def test_every_record_of_the_shared_files_loads(shared_file, rel, count):
    convs = load_conversations(shared_file(rel))
    assert len(convs) == count
    for conv in convs:
        assert_alternating(conv)
        assert conv[-1]["role"] == "assistant"


def test_fastchat_turn_counts_are_kept(shared_file):
    convs = load_conversations(shared_file("data/fastchat_dummy_conversation.json"))
    assert {len(c) for c in convs} <= {2, 4, 6}
    raw = json.loads(shared_file("data/fastchat_dummy_conversation.json").read_text())
    assert convs[0][0]["content"] == raw[0]["conversations"][0]["value"]


def test_oasst_trees_give_alternating_conversations_from_best_ranked_path(shared_file):
    path = shared_file("data/oasst2_filtered_trees.jsonl")
    best = load_conversations(path)
    every = load_conversations(path, paths="all")
    english = load_conversations(path, lang="en")
    # 551 trees, 433 of them a prompt with no reply: 111 best-path conversations
    assert len(best) == 111 and len(every) == 489 and len(english) == 49
    for conv in best + every:
        assert_alternating(conv)
        assert conv[-1]["role"] == "assistant"


def tree():
    def msg(mid, role, text, rank=None, replies=(), **kw):
        m = {"message_id": mid, "role": role, "text": text, "rank": rank, "lang": kw.get("lang", "en"),
             "deleted": kw.get("deleted", False), "review_result": kw.get("review", True), "replies": list(replies)}
        return m
    return {"message_tree_id": "t", "prompt": msg("q", "prompter", "Q?", replies=[
        msg("a1", "assistant", "second best", rank=1, replies=[msg("f1", "prompter", "follow-up")]),
        msg("a0", "assistant", "best", rank=0, replies=[
            msg("f0", "prompter", "more?", replies=[msg("b0", "assistant", "yes", rank=0)])]),
        msg("ax", "assistant", "deleted but rank -1", rank=-1, deleted=True),
        msg("ar", "assistant", "review failed", rank=-2, review=False)])}


def test_oasst_best_path_takes_rank_zero_and_skips_deleted_and_failed_reviews(tmp_path):
    path = write(tmp_path, "t.jsonl", [tree()], jsonl=True)
    assert load_conversations(path) == [[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "best"},
                                         {"role": "user", "content": "more?"}, {"role": "assistant", "content": "yes"}]]
    # every path (best first): the second-best branch ends on a prompter turn, which is cut after its last answer
    assert [c[-1]["content"] for c in load_conversations(path, paths="all")] == ["yes", "second best"]


def test_oasst_flat_messages_linked_by_parent_id(tmp_path):
    flat = [{"message_id": "q", "parent_id": None, "role": "prompter", "text": "Hi", "lang": "de", "review_result": True},
            {"message_id": "a", "parent_id": "q", "role": "assistant", "text": "Hallo", "rank": 0, "lang": "de", "review_result": True}]
    path = write(tmp_path, "flat.jsonl", flat, jsonl=True)
    assert load_conversations(path) == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hallo"}]]
    assert load_conversations(path, lang="en") == []


def test_alpaca_input_and_system_and_history(tmp_path):
    path = write(tmp_path, "a.json", [{"instruction": "Add", "input": "1 2", "output": "3", "system": "Be exact.",
                                       "history": [["hi", "hello"]]}])
    assert load_conversations(path) == [[
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Add\n\n1 2"},
        {"role": "assistant", "content": "3"}]]


def test_seed_tasks_use_the_first_instance(shared_file):
    conv = load_conversations(shared_file("data/alpaca_seed_tasks.jsonl"))[0]
    assert conv[0]["content"].startswith("Is there anything I can eat for a breakfast")
    assert conv[1]["content"].startswith("Yes, you can have 1 oatmeal banana protein shake")


def test_sharegpt_and_openai_roles(tmp_path):
    share = write(tmp_path, "s.json", [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "U"}, {"from": "gpt", "value": "A"},
        {"from": "human", "value": "dangling question"}]}])
    assert roles(load_conversations(share)[0]) == ["system", "user", "assistant"]
    oai = write(tmp_path, "o.jsonl", [{"messages": [{"role": "user", "content": "U"},
                                                    {"role": "assistant", "content": "A"}]}], jsonl=True)
    assert load_conversations(oai) == [[{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]]


def test_auto_detection_and_override(tmp_path):
    assert detect_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"messages": []}) == "openai"
    path = write(tmp_path, "a.json", [{"instruction": "x", "output": "y"}])
    with pytest.raises(SFTError, match="record 0: missing key 'conversations'"):
        load_conversations(path, format="sharegpt")
    with pytest.raises(SFTError, match="cannot tell the format"):
        load_conversations(write(tmp_path, "b.json", [{"foo": 1}]))


def test_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n{oops\n')
    with pytest.raises(SFTError, match=r"bad.jsonl:3: not valid JSON"):
        load_conversations(path)
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n')
    with pytest.raises(SFTError, match=r"bad.jsonl:2: key 'output' must be a string"):
        load_conversations(path)
    roles_bad = write(tmp_path, "r.json", [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                         {"role": "assistant", "content": "c"}]}])
    with pytest.raises(SFTError, match=r"r.json record 0: message 1 has role 'user'"):
        load_conversations(roles_bad)
    assert load_conversations(roles_bad, skip_invalid=True) == []
