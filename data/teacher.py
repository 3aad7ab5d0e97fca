"""One teacher/judge for synthesis, filtering and eval: a local model folder or an HTTP endpoint.

`Teacher.complete(messages, max_tokens, temperature) -> str` hides where the answer comes from:

* **local**: a model folder (HF layout) run with our own `Transformer.generate`. The chat is
  prompted through data/chat.py (the folder's chat template, or `template=`; a base model
  without one uses "alpaca"), the same way training and evaluation prompt it.
* **endpoint**: any OpenAI-compatible server, `POST {base_url}/chat/completions` with urllib,
  the API key read from an environment variable (never from a config file, so it is never
  written to disk or a log). Transient failures (connection errors, HTTP 429 and 5xx) are
  retried with exponential backoff: wait `backoff · 2^attempt` seconds, then give up with an
  error naming the URL.

Every answer is appended to a JSONL **cache** keyed by the SHA-256 of the request (backend,
messages, max_tokens, temperature). A run that was interrupted reads the cache back and only
asks what it had not asked yet; a torn last line (the process died mid-write) is skipped.
Sampling with temperature > 0 is cached too: re-running a synthesis gives the same data.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from model.errors import SFTError
from model.files import append_jsonl, read_jsonl

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class Teacher:
    """A chat model that answers `complete(messages)`; see the module docstring."""

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
        """The assistant's reply to `messages` (a list of {"role", "content"})."""
        return self.complete_many([messages], max_tokens, temperature)[0]

    def complete_many(self, batch: list[list[dict]], max_tokens: int = 256,
                      temperature: float = 0.0) -> list[str]:
        """Replies to several chats; a local model answers the cache misses in one batch."""
        keys = [self._key(m, max_tokens, temperature) for m in batch]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            if self._local:
                answers = self._local_generate([batch[i] for i in todo], max_tokens, temperature)
            else:
                answers = [self._http(batch[i], max_tokens, temperature) for i in todo]
            for i, a in zip(todo, answers):
                self._store(keys[i], a)
        return [self.cache[k] for k in keys]

    # ----------------------------------------------------------------------------- helpers
    def _key(self, messages, max_tokens, temperature) -> str:
        blob = json.dumps([self.backend_id, messages, max_tokens, temperature, self.seed], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _store(self, key: str, answer: str) -> None:
        self.cache[key] = answer
        if self.cache_path:
            append_jsonl(self.cache_path, {"key": key, "answer": answer})

    def _http(self, messages, max_tokens, temperature) -> str:
        url = f"{self.base_url}/chat/completions"
        body = json.dumps({"model": self.model_name, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature, "seed": self.seed}).encode()
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
                return payload["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in RETRY_STATUS:
                    raise SFTError(f"teacher endpoint {url}: {last} {e.read()[:200]!r}; check the URL, "
                                   f"model name and the API key in ${self.api_key_env}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(e)
            except (KeyError, IndexError, json.JSONDecodeError, TypeError) as e:
                last = f"malformed response ({e!r})"
        raise SFTError(f"teacher endpoint {url}: gave up after {self.max_retries + 1} attempts ({last})")

    def _local_generate(self, batch, max_tokens, temperature) -> list[str]:
        model, chat = self._local
        self.calls += len(batch)
        return chat.replies(model, batch, max_new_tokens=max_tokens, batch_size=len(batch),
                            temperature=temperature, top_k=40 if temperature > 0 else 0, seed=self.seed)


def _read_cache(path: Path) -> dict[str, str]:
    return {row["key"]: row["answer"] for row in read_jsonl(path, "teacher cache", resumable=True)
            if isinstance(row, dict) and "key" in row and "answer" in row}


def _load_local(folder: str, template: str | None, device: str):
    """(model, Chat) of a local model folder; its template as data/chat.py resolves it."""
    import torch

    from data.chat import chat_for
    from model import Tokenizer, load_pretrained
    model = load_pretrained(folder, dtype=torch.float32, device=device).eval()
    return model, chat_for(folder, Tokenizer.from_pretrained(folder), template or "auto",
                           model.config.eos_ids, option="[teacher] template")


def teacher_from_config(cfg: dict, cache_path: str | None = None) -> Teacher:
    """Build a Teacher from a `[teacher]` TOML table (model_dir= or base_url=, plus options)."""
    known = {"model_dir", "base_url", "model_name", "api_key_env", "template", "max_retries",
             "backoff", "timeout", "seed", "device", "cache_path"}
    unknown = set(cfg) - known
    if unknown:
        raise SFTError(f"[teacher]: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    args = dict(cfg)
    args.setdefault("cache_path", cache_path)
    return Teacher(**args)
