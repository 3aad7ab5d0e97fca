"""Pairwise judging: robust verdict parsing, both-order combination, and the full loop through a
real OpenAI-compatible HTTP server on 127.0.0.1."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from evaluation.judge import (answer_questions, combine, judge_messages, load_questions,
                              load_reference_answers, parse_verdict, run_judge)
from model.errors import SFTError


@pytest.mark.parametrize("reply, verdict", [
    ("Assistant A is more detailed. [[A]]", "A"),
    ('Format: "[[A]]" if A is better... Here B wins. Final: [[B]]', "B"),  # last bracket wins
    ("Both are fine. [[C]]", "tie"),
    ("[[ b ]]", "B"),
    ("[[tie]]", "tie"),
    ("My final verdict: A", "A"),
    ("Final verdict is [B].", "B"),
    ("Overall, Assistant B is clearly better.", "B"),
    ("It's a tie.", "tie"),
    ("My final verdict is a tie.", "tie"),  # the article "a" is not assistant A
    ("I cannot decide.", None),
    ("", None),
])
def test_parse_verdict_reads_brackets_then_phrases(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_combine_requires_agreement_in_both_orders():
    assert combine("A", "B") == ("win", False)    # M first wins, M second wins
    assert combine("B", "A") == ("loss", False)
    assert combine("A", "A") == ("tie", True)     # always the first position: pure order bias
    assert combine("tie", "tie") == ("tie", False)
    assert combine("A", None) == ("tie", True)    # unparsed game counts as a tie
    assert combine(None, None) == ("tie", False)


def test_judge_prompt_shows_both_answers_and_all_turns():
    single = judge_messages(["Q1"], ["ans-a"], ["ans-b"])
    assert single[0]["role"] == "system" and "[[A]]" in single[0]["content"]
    u = single[1]["content"]
    assert u.index("Q1") < u.index("ans-a") < u.index("ans-b")
    multi = judge_messages(["Q1", "Q2"], ["a1", "a2"], ["b1", "b2"])[1]["content"]
    assert multi.index("a1") < multi.index("Q2") < multi.index("a2") < multi.index("b1")


class FakeJudge:
    """A judge that prefers the longer answer, unless it always picks the first position."""

    def __init__(self, position_biased=False):
        self.biased, self.calls = position_biased, 0

    def complete(self, messages, max_tokens=512, temperature=0.0):
        self.calls += 1
        text = messages[-1]["content"]
        a = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
        b = text.split("[The Start of Assistant B's Answer]\n")[1].split("\n[The End")[0]
        if self.biased:
            return "A looks good. [[A]]"
        return "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"


def test_run_judge_counts_wins_ties_losses_and_order_flips():
    qs = [{"id": i, "category": "c", "turns": [f"q{i}"]} for i in range(4)]
    mine = [["long answer"], ["x"], ["same"], ["long answer"]]
    other = [["short"], ["longer one"], ["same"], ["tiny"]]
    res = run_judge(FakeJudge(), qs, mine, other)
    m = res["metrics"]
    assert (m["win_rate"], m["tie_rate"], m["loss_rate"], m["flip_rate"]) == (0.5, 0.25, 0.25, 0.0)
    assert m["score"] == pytest.approx(0.625) and m["n_prompts"] == 4
    biased = run_judge(FakeJudge(position_biased=True), qs, mine, other)["metrics"]
    assert biased["flip_rate"] == 1.0 and biased["tie_rate"] == 1.0
    assert biased["first_position_win_rate"] == 1.0


def test_answer_questions_feeds_each_turn_the_models_own_earlier_reply():
    seen = []

    def gen(convs):
        seen.append([list(c) for c in convs])
        return [f"r{len(c)}" for c in convs]
    out = answer_questions(gen, [{"turns": ["a", "b"]}], 2)
    assert out == [["r1", "r3"]]
    assert seen[1][0][1] == {"role": "assistant", "content": "r1"}


def test_question_and_reference_files_are_read_and_checked(tmp_path, shared_file):
    qs = load_questions(shared_file("data/mt_bench_question.jsonl"), limit=3)
    assert len(qs) == 3 and len(qs[0]["turns"]) == 2 and qs[0]["category"]
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"question_id": 81, "choices": [{"turns": ["x", "y"]}]}) + "\n"
                   + json.dumps({"question_id": 82, "answer": "z"}) + "\n")
    assert load_reference_answers(ref) == {81: ["x", "y"], 82: ["z"]}
    ref.write_text('{"answer": "z"}\n')
    with pytest.raises(SFTError, match=r"ref.jsonl:1: missing 'question_id'"):
        load_reference_answers(ref)


class _JudgeHandler(BaseHTTPRequestHandler):
    """/v1/chat/completions: prefers the answer containing 'REFERENCE' (or, if biased, always A)."""
    biased = False
    requests = []

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        text = body["messages"][-1]["content"]
        a_part = text.split("[The Start of Assistant B's Answer]")[0]
        verdict = "A" if self.biased or "REFERENCE" in a_part else "B"
        reply = {"choices": [{"message": {"role": "assistant",
                                          "content": f"Comparing both... my final verdict: [[{verdict}]]"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def judge_server():
    """A real OpenAI-compatible server on 127.0.0.1 (random port) in a daemon thread."""
    _JudgeHandler.requests, _JudgeHandler.biased = [], False
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", _JudgeHandler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_judge_cli_through_a_real_http_endpoint(judge_server, pico_dir, shared_file, tmp_path):
    import eval as eval_cli
    url, handler = judge_server
    questions = load_questions(shared_file("data/mt_bench_question.jsonl"), limit=2)
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"question_id": q["id"], "answer": "REFERENCE answer"}) + "\n"
                           for q in questions))
    base = ["--model", str(pico_dir), "--tasks", "judge", "--judge", url, "--reference", str(ref),
            "--limit", "2", "--max-new-tokens", "4", "--judge-retries", "0", "--judge-timeout", "10"]
    assert eval_cli.main(base + ["--out", str(tmp_path / "fair")]) == 0
    m = json.loads((tmp_path / "fair" / "eval.json").read_text())["tasks"]["judge"]["metrics"]
    assert (m["loss_rate"], m["flip_rate"], m["n_prompts"], m["n_unparsed"]) == (1.0, 0.0, 2, 0)
    assert len(handler.requests) == 4  # 2 questions x 2 orders
    assert handler.requests[0]["messages"][0]["role"] == "system"

    handler.biased = True
    assert eval_cli.main(base + ["--out", str(tmp_path / "biased")]) == 0
    m = json.loads((tmp_path / "biased" / "eval.json").read_text())["tasks"]["judge"]["metrics"]
    assert (m["tie_rate"], m["flip_rate"], m["first_position_win_rate"]) == (1.0, 1.0, 1.0)


def test_unreachable_judge_endpoint_is_a_clear_error(pico_dir, tmp_path, capsys):
    import eval as eval_cli
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"question_id": 81, "answer": "x"}) + "\n")
    code = eval_cli.main(["--model", str(pico_dir), "--tasks", "judge", "--judge", "http://127.0.0.1:9/v1",
                          "--reference", str(ref), "--limit", "1", "--max-new-tokens", "2",
                          "--judge-retries", "0", "--judge-timeout", "2", "--out", str(tmp_path / "o")])
    assert code == 2 and "gave up after 1 attempts" in capsys.readouterr().err
