"""One teacher/judge for synthesis, filtering and eval: a local model folder or an HTTP endpoint.

`Teacher.completions(chats) -> [Completion]` hides where the answers come from; a Completion is
the assistant turn as the model gave it: `content` (the answer text), `reasoning` (its thinking,
or None) and `tool_calls` ([{"id", "name", "arguments": dict}], the conversation model's layout
of data/conversation.py). `complete(messages) -> str` and `complete_many` are the text-only face
that the judge and most synthesis loops need.

* **local**: a model folder (HF layout) run with our own `Transformer.generate`, prompted through
  data/chat.py (the folder's chat template, or `template=`; a base model without one uses
  "alpaca"), the same way training and evaluation prompt it. A local model answers in text, so
  the text is read back into the same structure an endpoint returns: `<think>...</think>` becomes
  the reasoning, and, when the chat offers tools and the template has tool syntax (Llama-3.x,
  Qwen2.5/3), the calls are parsed with `data.tool_templates.parse_tool_calls`.
* **endpoint**: any OpenAI-compatible server, `POST {base_url}/chat/completions` with urllib,
  the API key read from an environment variable (never from a config file, so it is never
  written to disk or a log). The reply's `content`, `reasoning_content` and `tool_calls` are kept.
  Transient failures (connection errors, HTTP 429 and 5xx) are retried with exponential backoff:
  wait `backoff · 2^attempt` seconds, then give up with an error naming the URL.

Tools travel with the chat: a `data.conversation.Conversation` whose `.tools` holds function
schemas is sent with `"tools": [...]` (local: rendered into the prompt by the template), and the
conversation's messages, tool calls and results included, are sent in the OpenAI layout
(`to_openai_messages`), which is also how data.synth writes them and data.formats reads them.

A tool call the model botched (arguments that are not JSON, an unclosed `<tool_call>`) is not an
error of the run: the Completion says so in `problem` and the caller counts it as malformed.

Every answer is appended to a JSONL **cache** keyed by the SHA-256 of the request (backend,
messages, max_tokens, temperature, seed, and the tools when there are any). A run that was
interrupted reads the cache back and only asks what it had not asked yet; a torn last line (the
process died mid-write) is skipped. A line is `{"key", "answer": content}` plus `reasoning`,
`tool_calls` and `problem` when they are set, so a plain answer is written exactly as older
versions wrote it and their caches still read. Sampling with temperature > 0 is cached too:
re-running a synthesis gives the same data.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from data.conversation import tools_of
from data.formats_tools import to_tool_call
from data.templates import TEMPLATES
from data.tool_templates import THINK_CLOSE, TOOL_FAMILIES, parse_tool_calls, split_think
from model.errors import SFTError
from model.files import append_jsonl, read_jsonl
from model.options import opt

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

TemplateChoice = Literal[("auto", *TEMPLATES)]
Device = Literal["cpu", "cuda"]


@dataclass
class TeacherConfig:
    """The `[teacher]` table of data.synth and data.filter: exactly one of model_dir, base_url."""
    model_dir: str = opt("", "local model folder (HF layout) that answers; or set base_url")
    base_url: str = opt("", "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; or set model_dir")
    model_name: str = opt("default", "the endpoint's model name")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable that holds the endpoint's API key")
    template: TemplateChoice = opt("auto", "chat template of a local model (auto: its own, else alpaca)")
    max_retries: int = opt(4, "endpoint: retries of a failed request", ge=0)
    backoff: float = opt(1.0, "endpoint: seconds before the first retry, doubling each time", ge=0)
    timeout: float = opt(120.0, "endpoint: seconds to wait for one answer", gt=0)
    seed: int = opt(0, "sampling seed (local generation; sent to the endpoint)", ge=0)
    device: Device = opt("cpu", "where a local model runs")


@dataclass
class Completion:
    """One assistant turn: the answer text, its thinking and its tool calls (see the docstring)."""
    content: str
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)
    problem: str = ""  # why the tool calls could not be read ("" when they could)

    def message(self) -> dict:
        """The turn as an assistant message of data/conversation.py."""
        m = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            m["reasoning"] = self.reasoning
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m


class Teacher:
    """A chat model that answers `completions(chats)`; see the module docstring."""

    def __init__(self, *, model_dir: str | None = None, base_url: str | None = None,
                 model_name: str = "default", api_key_env: str = "OPENAI_API_KEY",
                 cache_path: str | None = None, template: str | None = None,
                 max_retries: int = 4, backoff: float = 1.0, timeout: float = 120.0,
                 seed: int = 0, device: str = "cpu"):
        if (model_dir is None) == (base_url is None):
            raise SFTError("teacher: give exactly one of model_dir= (local folder) or base_url= (endpoint)")
        self.base_url = base_url.rstrip("/") if base_url else None
        self.model_name, self.api_key_env = model_name, api_key_env
        self.max_retries, self.backoff, self.timeout, self.seed = max_retries, backoff, timeout, seed
        self.backend_id = f"http:{self.base_url}:{model_name}" if base_url else f"local:{Path(model_dir).resolve()}"
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache = _read_cache(self.cache_path) if self.cache_path else {}
        self.calls = 0  # requests actually sent (cache misses)
        self._local = _load_local(model_dir, template, device) if model_dir else None

    # ------------------------------------------------------------------------------ public
    def complete(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0) -> str:
        """The assistant's answer text for `messages` (a list of {"role", "content"})."""
        return self.completions([messages], max_tokens, temperature)[0].content

    def complete_many(self, batch: list[list[dict]], max_tokens: int = 256,
                      temperature: float = 0.0) -> list[str]:
        """The answer texts for several chats."""
        return [c.content for c in self.completions(batch, max_tokens, temperature)]

    def completions(self, batch: list[list[dict]], max_tokens: int = 256,
                    temperature: float = 0.0) -> list[Completion]:
        """The assistant turns for several chats (a Conversation's `.tools` are offered to the
        model); cache misses are asked in one go, a local model answering them in one batch."""
        keys = [self._key(m, max_tokens, temperature) for m in batch]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            with tqdm(total=len(todo), desc="teacher", unit="answer", leave=False,
                      disable=True if len(todo) == 1 else None) as bar:
                if self._local:
                    answers = self._local_generate([batch[i] for i in todo], max_tokens, temperature, bar.update)
                    for i, a in zip(todo, answers):
                        self._store(keys[i], a)
                else:
                    for i in todo:  # each answer is cached as it arrives: a later failure loses none
                        self._store(keys[i], self._http(batch[i], max_tokens, temperature))
                        bar.update(1)
        return [self.cache[k] for k in keys]

    # ----------------------------------------------------------------------------- helpers
    def _key(self, messages, max_tokens, temperature) -> str:
        request = [self.backend_id, messages, max_tokens, temperature, self.seed]
        tools = tools_of(messages)
        blob = json.dumps(request + [tools] if tools else request, sort_keys=True)  # old keys stay valid
        return hashlib.sha256(blob.encode()).hexdigest()

    def _store(self, key: str, answer: Completion) -> None:
        self.cache[key] = answer
        if self.cache_path:
            row = {"key": key, "answer": answer.content, "reasoning": answer.reasoning,
                   "tool_calls": answer.tool_calls, "problem": answer.problem}
            append_jsonl(self.cache_path, {k: v for k, v in row.items() if v or k == "answer"})

    def _http(self, messages, max_tokens, temperature) -> Completion:
        url = f"{self.base_url}/chat/completions"
        request = {"model": self.model_name, "messages": to_openai_messages(messages), "max_tokens": max_tokens,
                   "temperature": temperature, "seed": self.seed}
        if tools_of(messages):
            request["tools"] = tools_of(messages)
        body = json.dumps(request).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.calls += 1
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                return completion_from_message(payload["choices"][0]["message"], url)
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in RETRY_STATUS:
                    raise SFTError(f"teacher endpoint {url}: {last} {e.read()[:200]!r}; check the URL, "
                                   f"model name and the API key in ${self.api_key_env}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(e)
            except (KeyError, IndexError, AttributeError, json.JSONDecodeError, TypeError) as e:
                last = f"malformed response ({e!r})"
        raise SFTError(f"teacher endpoint {url}: gave up after {self.max_retries + 1} attempts ({last})")

    def _local_generate(self, batch, max_tokens, temperature, progress) -> list[Completion]:
        model, chat = self._local
        self.calls += len(batch)
        texts = chat.replies(model, batch, max_new_tokens=max_tokens, batch_size=len(batch),
                             temperature=temperature, top_k=40 if temperature > 0 else 0, seed=self.seed,
                             progress=progress)
        return [completion_from_text(chat.template, t, bool(tools_of(m))) for t, m in zip(texts, batch)]


# ----------------------------------------------------------------------------- answers

def _finish(content: str, reasoning: str | None, calls: list[dict], problem: str = "") -> Completion:
    """Thinking written inline is split off as data.formats does; calls get ids ("call_0", ...)."""
    if reasoning is None and THINK_CLOSE in content:
        reasoning, content = split_think(content)
    calls = [{"id": f"call_{k}", **c} if "id" not in c else c for k, c in enumerate(calls)]
    return Completion(content, reasoning or None, calls, problem)


def completion_from_message(msg: dict, where: str) -> Completion:
    """An endpoint's `choices[0].message` -> Completion (a malformed call -> `problem`)."""
    content, reasoning = msg.get("content") or "", msg.get("reasoning_content", msg.get("reasoning"))
    if not isinstance(content, str) or not isinstance(reasoning, (str, type(None))):
        raise TypeError(f"content and reasoning_content must be strings, got {msg!r:.120}")
    try:
        calls = [to_tool_call(c, f"{where}: tool_calls[{k}]") for k, c in enumerate(msg.get("tool_calls") or [])]
    except SFTError as e:
        return _finish(content, reasoning, [], str(e))
    return _finish(content, reasoning, calls)


def completion_from_text(template: str, text: str, offered_tools: bool) -> Completion:
    """A local model's generated text -> Completion. Tool calls are read only when tools were
    offered (a Llama reply that is a JSON object is otherwise just an answer in JSON)."""
    if not (offered_tools and template in TOOL_FAMILIES):
        return _finish(text, None, [])
    reasoning, content = split_think(text)
    parsed = parse_tool_calls(template, content)
    if not parsed.attempted:
        return _finish(content, reasoning, [])
    if not parsed.parseable:
        return _finish(content, reasoning, [], parsed.problem)
    # Qwen writes its answer text before the <tool_call> blocks; a Llama call turn is the call alone
    before = content.split("<tool_call>")[0].strip() if template.startswith("qwen") else ""
    return _finish(before, reasoning, parsed.calls)


def to_openai_messages(messages: list[dict]) -> list[dict]:
    """Conversation messages (data/conversation.py) -> the OpenAI chat layout, the inverse of
    data.formats_tools.openai_message: `reasoning` as `reasoning_content`, each call as
    {"id", "type": "function", "function": {"name", "arguments": JSON string}}."""
    out = []
    for m in messages:
        o = {"role": m["role"], "content": m["content"]}
        if m.get("reasoning") is not None:
            o["reasoning_content"] = m["reasoning"]
        if m.get("tool_calls"):
            o["tool_calls"] = [{**({"id": c["id"]} if "id" in c else {}), "type": "function",
                                "function": {"name": c["name"],
                                             "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                               for c in m["tool_calls"]]
        o.update({k: m[k] for k in ("name", "tool_call_id") if m["role"] == "tool" and k in m})
        out.append(o)
    return out


# ------------------------------------------------------------------------------ set-up

def _read_cache(path: Path) -> dict[str, Completion]:
    return {row["key"]: Completion(row["answer"], row.get("reasoning"), row.get("tool_calls") or [],
                                   row.get("problem", ""))
            for row in read_jsonl(path, "teacher cache", resumable=True)
            if isinstance(row, dict) and "key" in row and isinstance(row.get("answer"), str)}


def _load_local(folder: str, template: str | None, device: str):
    """(model, Chat) of a local model folder; its template as data/chat.py resolves it."""
    import torch

    from data.chat import chat_for
    from model import Tokenizer, load_pretrained
    model = load_pretrained(folder, dtype=torch.float32, device=device).eval()
    return model, chat_for(folder, Tokenizer.from_pretrained(folder), template or "auto",
                           model.config.eos_ids, option="teacher.template")


def check_teacher(cfg: TeacherConfig, where: str) -> None:
    """Exactly one backend, checked when the config is read (before any work starts)."""
    if bool(cfg.model_dir) == bool(cfg.base_url):
        raise SFTError(f"{where}: [teacher] needs exactly one of model_dir = \"<model folder>\" or "
                       f"base_url = \"http://host:port/v1\" (got {'both' if cfg.model_dir else 'neither'})")


def teacher_from_config(cfg: TeacherConfig, cache_path: str | Path | None = None) -> Teacher:
    """The Teacher a checked `[teacher]` table describes."""
    return Teacher(model_dir=cfg.model_dir or None, base_url=cfg.base_url or None, model_name=cfg.model_name,
                   api_key_env=cfg.api_key_env, cache_path=str(cache_path) if cache_path else None,
                   template=cfg.template, max_retries=cfg.max_retries, backoff=cfg.backoff,
                   timeout=cfg.timeout, seed=cfg.seed, device=cfg.device)
