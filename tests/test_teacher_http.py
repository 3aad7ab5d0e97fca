"""A real OpenAI-compatible HTTP server (stdlib, 127.0.0.1, in a thread) answering with pico-base
drives the teacher, the judge filter and the three synthesis loops end to end."""
import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data import synth
from data.conversation import Conversation
from data.formats import load_conversations
from data.quality import JudgeFilter, judge_filter
from data.synth import (ConstrainedOptions, EvolOptions, SelfInstructOptions, constrained_responses, evol_instruct,
                        read_jsonl, read_seed_tasks, self_instruct)
from data.teacher import Completion, Teacher, _read_cache
from model.errors import SFTError


@contextlib.contextmanager
def serve(answer):
    """A stdlib OpenAI-compatible server on 127.0.0.1 in a thread; answer(body) -> the reply's
    `message`, or an int HTTP error status. Yields (base URL, the request bodies received)."""
    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(dict(body, authorization=self.headers.get("Authorization")))
            message = answer(body)
            if isinstance(message, int):
                self.send_error(message)
                return
            out = json.dumps({"choices": [{"message": message}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", bodies
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server(pico_dir):
    local = Teacher(model_dir=str(pico_dir))  # the server's brain: our own generate
    state = {"fail_next": 0}

    def answer(body):
        if state["fail_next"] > 0:
            state["fail_next"] -= 1
            return 503
        text = local.complete(body["messages"], max_tokens=min(body["max_tokens"], 24),
                              temperature=body.get("temperature", 0.0))
        if "Rate the quality" in body["messages"][-1]["content"] and "crepes" in body["messages"][-1]["content"]:
            text = "Score: 4\nReason: clear steps."  # one well-formed judge answer among pico's noise
        return {"role": "assistant", "content": text}

    with serve(answer) as (url, bodies):
        state["bodies"] = bodies
        yield url, state


def _teacher(url, tmp_path, **kw):
    return Teacher(base_url=url, cache_path=str(tmp_path / "cache.jsonl"), backoff=0.01, timeout=30, **kw)


def test_endpoint_answers_retries_transient_errors_and_caches(server, tmp_path, monkeypatch):
    url, state = server
    monkeypatch.setenv("SFT_TEST_KEY", "sk-test")
    t = _teacher(url, tmp_path, api_key_env="SFT_TEST_KEY", max_retries=3)
    state["fail_next"] = 2
    msgs = [{"role": "user", "content": "Name a colour."}]
    first = t.complete(msgs, max_tokens=8)
    assert isinstance(first, str) and t.calls == 3 and state["bodies"][-1]["authorization"] == "Bearer sk-test"
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
    kept, rejects = judge_filter(records, _teacher(url, tmp_path), JudgeFilter(min_score=3, max_tokens=16))
    assert kept == records[:1]
    assert len(rejects) == 1 and ("malformed" in rejects[0][1] or "score" in rejects[0][1])


def test_synthesis_loops_run_end_to_end_and_resume(server, tmp_path, shared_file):
    url, _ = server
    t = _teacher(url, tmp_path)
    seeds = read_seed_tasks(shared_file("data/alpaca_seed_tasks.jsonl"))
    out = tmp_path / "si.jsonl"
    opts = SelfInstructOptions(num_instructions=2, batch_size=2, max_rounds=2, max_tokens=24)
    stats = self_instruct(t, seeds, str(out), opts)
    assert stats["asked"] == 4 and stats["accepted"] + stats["malformed"] + stats["not_novel"] + stats["filtered"] == 4
    records = [{"instruction": "Give three tips for staying healthy.", "input": ""},
               {"instruction": "Name a planet.", "input": ""}]
    evo = evol_instruct(t, records, str(tmp_path / "evol.jsonl"), EvolOptions(max_tokens=16))
    assert evo["accepted"] + evo["eliminated"] + evo["malformed"] == 2
    con_opts = ConstrainedOptions(attempts=2, max_tokens=16)
    con = constrained_responses(t, records, str(tmp_path / "con.jsonl"), con_opts)
    assert con["accepted"] + con["no_passing_answer"] == 2
    again = constrained_responses(t, records, str(tmp_path / "con.jsonl"), con_opts)
    assert again["resumed"] == len(read_jsonl(tmp_path / "con.jsonl", resumable=True))


def test_cache_file_with_a_torn_last_line_still_resumes(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "answer": "one"}\n{"key": "b", "ans')  # the old layout: answer text only
    assert _read_cache(path) == {"a": Completion("one")}


def test_teacher_needs_exactly_one_backend():
    with pytest.raises(SFTError, match="exactly one"):
        Teacher()


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def tool_endpoint(body):
    """A scripted reasoning model: calls get_weather when offered it, thinks inline otherwise."""
    question = body["messages"][-1]["content"]
    if "Paris" in question and body.get("tools"):
        return {"role": "assistant", "content": None, "reasoning_content": "The user wants the weather.",
                "tool_calls": [{"id": "call_abc", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    if "Oslo" in question:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Oslo"}}]}
    if body["messages"][-1]["role"] == "tool":
        return {"role": "assistant", "content": "It is 21 C in Rome."}
    return {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHi there!"}


def test_tool_calls_and_reasoning_from_an_endpoint_round_trip_through_synth_and_load_conversations(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rome_call = {"id": "r1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "old"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "old"}]},
        {"messages": [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "old"}]},
        {"messages": [{"role": "user", "content": "Weather in Rome?"},
                      {"role": "assistant", "content": None, "tool_calls": [rome_call]},
                      {"role": "tool", "tool_call_id": "r1", "content": '{"temp": 21}'},
                      {"role": "assistant", "content": "old"}]},
    ]) + "\n")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    with serve(tool_endpoint) as (url, bodies):
        cfg = tmp_path / "synth.toml"
        cfg.write_text(f'output_dir = "{tmp_path / "out"}"\n[teacher]\nbase_url = "{url}"\nmax_retries = 0\n'
                       f'[answers]\ninput = "{prompts}"\ntools = "{tools}"\nbatch_size = 2\n')
        assert synth.main(["--config", str(cfg)]) == 0
        assert len(bodies) == 4 and all(b["tools"] == [WEATHER] for b in bodies)
        # the earlier call went out in the OpenAI layout: arguments as a JSON string
        assert bodies[3]["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'
        assert synth.main(["--config", str(cfg)]) == 0 and len(bodies) == 4  # resumed: nothing asked again
        # the cache keeps the structured answer: a new teacher answers from it without a request
        again = Teacher(base_url=url, cache_path=str(tmp_path / "out" / "teacher_cache.jsonl"))
        [cached] = again.completions([Conversation([{"role": "user", "content": "Weather in Paris?"}], [WEATHER])],
                                     max_tokens=512, temperature=0.7)
        assert again.calls == 0 and len(bodies) == 4

    out = tmp_path / "out" / "answers.jsonl"
    rows = read_jsonl(out)
    assert [r["parent_index"] for r in rows] == [0, 1, 3]  # Oslo's call had arguments that are not JSON
    call = rows[0]["messages"][-1]["tool_calls"][0]
    assert call == {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert rows[0]["messages"][-1]["reasoning_content"] == "The user wants the weather."
    paris, hi, rome = load_conversations(out)
    assert paris.tools == [WEATHER] and hi.tools == [WEATHER]
    assert paris[-1] == {"role": "assistant", "content": "", "reasoning": "The user wants the weather.",
                         "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_abc"}]}
    assert hi[-1] == {"role": "assistant", "content": "Hi there!", "reasoning": "A greeting."}
    assert [m["role"] for m in rome] == ["user", "assistant", "tool", "assistant"]
    assert rome[1]["tool_calls"][0]["arguments"] == {"city": "Rome"} and rome[-1]["content"] == "It is 21 C in Rome."
    assert cached.tool_calls == paris[-1]["tool_calls"] and cached.reasoning == paris[-1]["reasoning"]


def test_a_cache_written_by_the_text_only_version_still_answers(tmp_path):
    import hashlib
    t = Teacher(base_url="http://127.0.0.1:9/v1", max_retries=0)  # nothing listens there
    msgs = [{"role": "user", "content": "Name a colour."}]
    old_key = hashlib.sha256(json.dumps([t.backend_id, msgs, 8, 0.0, 0], sort_keys=True).encode()).hexdigest()
    (tmp_path / "cache.jsonl").write_text(json.dumps({"key": old_key, "answer": "Blue."}) + "\n")
    t = Teacher(base_url="http://127.0.0.1:9/v1", max_retries=0, cache_path=str(tmp_path / "cache.jsonl"))
    assert t.complete(msgs, max_tokens=8) == "Blue." and t.calls == 0
