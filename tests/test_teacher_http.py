"""A real OpenAI-compatible HTTP server (stdlib, 127.0.0.1, in a thread) answering with pico-base
drives the teacher, the judge filter and the three synthesis loops end to end."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data.filters import judge_filter
from data.synth import constrained_responses, evol_instruct, read_jsonl, self_instruct
from data.teacher import Teacher
from model.errors import SFTError


@pytest.fixture(scope="module")
def server(pico_dir):
    pico = pico_dir
    local = Teacher(model_dir=str(pico))  # the server's brain: our own generate
    state = {"requests": 0, "fail_next": 0, "auth": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            state["requests"] += 1
            state["auth"].append(self.headers.get("Authorization"))
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            if state["fail_next"] > 0:
                state["fail_next"] -= 1
                self.send_error(503)
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = local.complete(body["messages"], max_tokens=min(body["max_tokens"], 24),
                                  temperature=body.get("temperature", 0.0))
            if "Rate the quality" in body["messages"][-1]["content"] and "crepes" in body["messages"][-1]["content"]:
                text = "Score: 4\nReason: clear steps."  # one well-formed judge answer among pico's noise
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    httpd.shutdown()
    httpd.server_close()


def _teacher(url, tmp_path, **kw):
    return Teacher(base_url=url, cache_path=str(tmp_path / "cache.jsonl"), backoff=0.01, timeout=30, **kw)


def test_endpoint_answers_retries_transient_errors_and_caches(server, tmp_path, monkeypatch):
    url, state = server
    monkeypatch.setenv("SFT_TEST_KEY", "sk-test")
    t = _teacher(url, tmp_path, api_key_env="SFT_TEST_KEY", max_retries=3)
    state["fail_next"] = 2
    msgs = [{"role": "user", "content": "Name a colour."}]
    first = t.complete(msgs, max_tokens=8)
    assert isinstance(first, str) and t.calls == 3 and state["auth"][-1] == "Bearer sk-test"
    again = _teacher(url, tmp_path)  # a new process would read the same cache file
    assert again.complete(msgs, max_tokens=8) == first and again.calls == 0


def test_endpoint_gives_up_with_a_clear_error(server, tmp_path):
    url, state = server
    state["fail_next"] = 5
    with pytest.raises(SFTError, match="gave up after 2 attempts"):
        _teacher(url, tmp_path, max_retries=1).complete([{"role": "user", "content": "x"}])
    state["fail_next"] = 0


def test_judge_filter_through_http_counts_malformed_answers(server, tmp_path):
    url, _ = server
    records = [{"instruction": "Describe a process of making crepes.", "input": "", "output": "Mix, pour, flip."},
               {"instruction": "Say hi.", "input": "", "output": "Hi."}]
    kept, rejects = judge_filter(records, _teacher(url, tmp_path), min_score=3, max_tokens=16)
    assert kept == records[:1]
    assert len(rejects) == 1 and ("malformed" in rejects[0][1] or "score" in rejects[0][1])


def test_synthesis_loops_run_end_to_end_and_resume(server, tmp_path, shared_file):
    url, _ = server
    t = _teacher(url, tmp_path)
    seeds = str(shared_file("data/alpaca_seed_tasks.jsonl"))
    out = tmp_path / "si.jsonl"
    stats = self_instruct(t, seeds, str(out), num_instructions=2, batch_size=2, max_rounds=2, max_tokens=24)
    assert stats["asked"] == 4 and stats["accepted"] + stats["malformed"] + stats["not_novel"] + stats["filtered"] == 4
    records = [{"instruction": "Give three tips for staying healthy.", "input": ""},
               {"instruction": "Name a planet.", "input": ""}]
    evo = evol_instruct(t, records, str(tmp_path / "evol.jsonl"), max_tokens=16)
    assert evo["accepted"] + evo["eliminated"] + evo["malformed"] == 2
    con = constrained_responses(t, records, str(tmp_path / "con.jsonl"), attempts=2, max_tokens=16)
    assert con["accepted"] + con["no_passing_answer"] == 2
    again = constrained_responses(t, records, str(tmp_path / "con.jsonl"), attempts=2, max_tokens=16)
    assert again["resumed"] == len(read_jsonl(tmp_path / "con.jsonl", resumable=True))


def test_cache_file_with_a_torn_last_line_still_resumes(tmp_path):
    from data.teacher import _read_cache
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "answer": "one"}\n{"key": "b", "ans')
    assert _read_cache(path) == {"a": "one"}


def test_teacher_needs_exactly_one_backend():
    with pytest.raises(SFTError, match="exactly one"):
        Teacher()
