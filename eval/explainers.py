"""Explainers and judges behind one interface, an on-disk response cache, and `describe_features`.

    from featureatlas.eval.explainers import (TemplateExplainer, LocalExplainer, OpenAIExplainer, ResponseCache,
                                              describe_features)
    ex = OpenAIExplainer("http://127.0.0.1:8080/v1", "qwen2.5-7b-instruct", api_key_env="OPENAI_API_KEY")
    answers = ex.complete(["Say hi."], max_tokens=8, temperature=0.0, cache=ResponseCache("out/llm-cache"))
    done = describe_features(records, ex, ["maxact", "vocabproj"], cache=ResponseCache("out/llm-cache"))
    for rec, descs in zip(records, done.descriptions):   # done.failures: this call's failed slots, per record
        rec["descriptions"] = descs

Interface (`Explainer.complete`): a list of prompts (a string = one user turn, or chat messages
[{"role", "content"}, ...]) -> a list of `Answer`, n per prompt (answers[i * n + j] is sample
first_sample + j of prompt i). An Answer is text (None + error when the call failed), the finish reason,
optional top log-probs per generated token, and its cost: seconds, tokens_in, tokens_out.

Backends:
- `template`: no LLM (`template_description`), a deterministic description from the evidence: the honest
  offline default. It takes no prompts.
- `local`: SmolLM2-135M-Instruct through featureatlas's own `generate` and its ChatML template, batched by
  prompt length, fully offline. The model is loaded on the first call that the cache cannot answer.
- `openai`: any OpenAI-compatible POST {base_url}/chat/completions (llama.cpp server, vLLM, a hosted API).
  The key is read from an environment variable and held in an object that never prints it: it is not in
  any file, log line, exception message, repr or cache key (error texts from the server are scrubbed of
  it too). Retries: 429, 5xx, timeouts and connection errors (incl. a reply cut mid-body) are retried up to
  max_retries times after min(cap, backoff * 2^attempt) * U(0.5, 1) seconds, or the server's Retry-After
  when it sends one (capped). Other 4xx, malformed JSON and missing fields fail that prompt at once.
  Concurrency: a thread pool of `concurrency` workers over one connection pool. Before the first request
  `check()` probes the endpoint and raises a FeatureAtlasError for an unreachable, non-JSON or key-refusing
  endpoint, so nothing is written.

Response cache: one small JSON file per answer, cache_dir/ab/<sha256>.json, the key being
sha256(JSON of backend, model, messages, params incl. the sample index), written with `atomic_write`.
Failed calls are not cached; a rerun answers every cached request without touching the backend.

Descriptions (features.jsonl schema): {"text", "method", "explainer", "model", "prompt_method", "evidence",
"seconds", "tokens_in", "tokens_out", "sample"}. `describe_features` returns them apart from the failures
of the call, {"failed": true, "error", "method", "explainer", "model", "prompt_method", "sample"} (no text):
a failure is never stored as a description, and a rerun retries exactly the missing slots.
"""
from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

from featureatlas.activation_store.errors import ConfigError, FeatureAtlasError
from featureatlas.activation_store.runs import atomic_write
from featureatlas.eval import prompts as P
from featureatlas.eval.prompts import MissingEvidence, PromptConfig, show_token

log = logging.getLogger(__name__)

CACHE_FORMAT = "featureatlas-llm-cache/1"
TEMPLATE_VERSION = "template-v1"
"""`prompt_method` of template descriptions (bumped when the template's wording changes)."""
LOCAL_MODEL_NAME = "smollm2-135m-instruct"
EXPLAINERS = ("template", "local", "openai")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
class MissingAPIKeyError(ConfigError):
    """The environment variable meant to hold the API key is unset or empty."""


class EndpointUnreachableError(FeatureAtlasError, ConnectionError):
    """No server answers at the endpoint's URL."""


class EndpointResponseError(FeatureAtlasError, ValueError):
    """The endpoint answers, but not as an OpenAI-compatible JSON API (or it refuses the key)."""


# ---------------------------------------------------------------------------------------------
# Answers and prompts
# ---------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """One completion: text, or None with `error` when the call failed."""

    text: str | None
    """The generated text; None when the call failed."""
    error: str | None = None
    """Why the call failed (never contains the API key)."""
    finish_reason: str | None = None
    """"stop" (ended by the model), "length" (hit max_tokens) or None when unknown."""
    logprobs: list | None = None
    """When asked: per generated token, its top alternatives [[token, logprob], ...], most likely first."""
    seconds: float = 0.0
    """Wall time the call took (for a cached answer: when it was made)."""
    tokens_in: int = 0
    """Prompt tokens (as the backend counts them; 0 when it did not say)."""
    tokens_out: int = 0
    """Generated tokens (0 when the backend did not say)."""
    cached: bool = False
    """True when the answer came from the response cache."""

    @property
    def ok(self) -> bool:
        return self.text is not None

    @classmethod
    def failed(cls, error: str, seconds: float = 0.0) -> "Answer":
        return cls(text=None, error=error, seconds=seconds)


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string is one user turn; messages are checked and copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt:
        out = []
        for m in prompt:
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ConfigError(f"a chat message must be {{'role': str, 'content': str}}, got {m!r}")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise ConfigError(f"a prompt must be a string or a non-empty list of chat messages, got {type(prompt).__name__}")


# ---------------------------------------------------------------------------------------------
# Response cache
# ---------------------------------------------------------------------------------------------
class ResponseCache:
    """Answers on disk, one JSON file per request: <dir>/<key[:2]>/<key>.json (atomic writes).

    key = sha256 of the canonical JSON of {backend, model, messages, params}; params hold max_tokens,
    temperature, logprobs, top_logprobs and the sample index, never credentials.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"response cache {self.directory} exists and is not a directory; pass a directory path")
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.directory)!r})"

    @staticmethod
    def key(backend: str, model: str, messages: list[dict], params: Mapping[str, Any]) -> str:
        blob = json.dumps({"backend": backend, "model": model, "messages": messages, "params": dict(params)},
                          sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Answer | None:
        try:
            data = json.loads(self.path(key).read_text(encoding="utf-8"))
            fields = {k: data["answer"][k] for k in Answer.__dataclass_fields__ if k in data["answer"]}
            answer = Answer(**fields)
        except (OSError, ValueError, KeyError, TypeError):
            self.misses += 1
            return None  # absent or unreadable: ask again
        if not answer.ok:
            self.misses += 1
            return None
        answer.cached = True
        self.hits += 1
        return answer

    def put(self, key: str, answer: Answer, *, request: Mapping[str, Any] | None = None) -> None:
        """Store a successful answer (failed answers are never cached)."""
        if not answer.ok:
            return
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {k: v for k, v in asdict(answer).items() if k != "cached"}
        record = {"format": CACHE_FORMAT, "key": key, "request": dict(request or {}), "answer": body}
        atomic_write(path, json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("??/*.json")) if self.directory.is_dir() else 0


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    messages: list
    sample: int


class Explainer:
    """Base of every backend: `complete` with the response cache; backends implement `_generate`."""

    backend = ""
    model = ""
    top_logprobs = 5

    def __init__(self, *, cache: ResponseCache | None = None):
        self.cache = cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"

    def check(self) -> None:
        """Raise a FeatureAtlasError when the backend cannot work (called before the first uncached request)."""

    def complete(self, prompts: Sequence, *, max_tokens: int, temperature: float = 0.0, n: int = 1,
                 logprobs: bool = False, first_sample: int = 0, cache: ResponseCache | None = None) -> list[Answer]:
        """n answers per prompt, answers[i * n + j] = sample first_sample + j of prompt i.

        Cached answers are returned without calling the backend; new successful answers are cached.
        """
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature!r}")
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be an integer >= 1, got {n!r}")
        messages = [as_messages(p) for p in prompts]
        cache = cache if cache is not None else self.cache
        params = {"max_tokens": max_tokens, "temperature": float(temperature), "logprobs": bool(logprobs),
                  "top_logprobs": self.top_logprobs if logprobs else 0}
        requests = [Request(messages[i], first_sample + j) for i in range(len(messages)) for j in range(n)]
        answers: list[Answer | None] = [None] * len(requests)
        keys: list[str | None] = [None] * len(requests)
        todo = []
        for r, req in enumerate(requests):
            if cache is not None:
                keys[r] = cache.key(self.backend, self.model, req.messages, {**params, "sample": req.sample})
                hit = cache.get(keys[r])
                if hit is not None:
                    answers[r] = hit
                    continue
            todo.append(r)
        if todo:
            self.check()
            fresh = self._generate([requests[r] for r in todo], max_tokens=max_tokens,
                                   temperature=float(temperature), logprobs=bool(logprobs))
            for r, answer in zip(todo, fresh):
                answers[r] = answer
                if cache is not None and answer.ok:
                    cache.put(keys[r], answer, request={"backend": self.backend, "model": self.model,
                                                        "params": {**params, "sample": requests[r].sample},
                                                        "messages": requests[r].messages})
        return answers  # type: ignore[return-value]

    def _generate(self, requests: list[Request], *, max_tokens: int, temperature: float,
                  logprobs: bool) -> list[Answer]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# template: no LLM
# ---------------------------------------------------------------------------------------------
def _ranked(items: Iterable) -> list[tuple[Any, int]]:
    """Distinct items by count, descending; ties in order of first appearance."""
    counts = Counter()
    first: dict = {}
    for i, x in enumerate(items):
        counts[x] += 1
        first.setdefault(x, i)
    return sorted(counts.items(), key=lambda kv: (-kv[1], first[kv[0]]))


def _peaks(record: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """(peak token, the token before it) of each top example window that fires."""
    out = []
    for ex in (record.get("examples") or {}).get("top") or []:
        toks, acts = ex.get("tokens") or [], ex.get("acts") or []
        if not toks or not acts or max(acts) <= 0:
            continue
        pos = ex.get("max_pos")
        if not isinstance(pos, int) or not 0 <= pos < len(toks):
            pos = max(range(len(acts)), key=lambda i: acts[i])
        out.append((toks[pos], toks[pos - 1] if pos > 0 else None))
    return out


def _template_part(record: Mapping[str, Any], method: str, n: int) -> str | None:
    if method == "maxact":
        peaks = _peaks(record)
        if not peaks:
            return None
        text = "fires on " + ", ".join(show_token(t) for t, _ in _ranked(t for t, _ in peaks)[:n])
        prev = _ranked(p for _, p in peaks if p is not None)
        if prev and prev[0][1] >= 2 and 2 * prev[0][1] >= len(peaks):
            text += f" (often after {show_token(prev[0][0])})"
        return text
    if method == "vocabproj":
        vp = record.get("vocab_proj") or {}
        top, bottom = list(vp.get("top") or []), list(vp.get("bottom") or [])
        if not top:
            return None
        text = "promotes " + P.token_list(top, n)
        return text + ("; suppresses " + P.token_list(bottom, n) if bottom else "")
    if method == "tokenchange":
        tc = record.get("token_change") or {}
        for sign, verb in (("pos", "amplifying it"), ("neg", "setting it negative")):
            part = tc.get(sign) or {}
            up, down = list(part.get("up") or []), list(part.get("down") or [])
            if up or down:
                bits = ([f"raises {P.token_list(up, n)}"] if up else []) + \
                    ([f"lowers {P.token_list(down, n)}"] if down else [])
                return f"{verb} " + " and ".join(bits)
        return None
    raise ValueError(method)


def template_description(record_or_evidence: Mapping[str, Any], method: str, *, n: int = 3) -> str | None:
    """A deterministic description from the evidence alone (no LLM); None when the evidence is missing.

    maxact: the most frequent peak tokens of the top windows (and the usual token before them);
    vocabproj: top and bottom projected tokens; tokenchange: tokens raised / lowered by a +c clamp;
    ensemble-raw: the input part and the first output part joined by "; "; ensemble-concat: as
    `prompts.concat_descriptions` joins the three. E.g.
    'fires on " Paris", " London" (often after " to"); promotes " France", " French"'.
    """
    if method not in P.METHODS:
        raise ConfigError(f"unknown description method {method!r}; choose from {', '.join(P.METHODS)}")
    if method in P.CONCAT_PARTS:
        return _template_part(record_or_evidence, method, n)
    if method == "ensemble-concat":
        return P.concat_descriptions({m: _template_part(record_or_evidence, m, n) for m in P.CONCAT_PARTS})
    out = _template_part(record_or_evidence, "vocabproj", n) or _template_part(record_or_evidence, "tokenchange", n)
    parts = [p for p in (_template_part(record_or_evidence, "maxact", n), out) if p]
    return "; ".join(parts) if parts else None


class TemplateExplainer(Explainer):
    """No LLM: descriptions written by `template_description` (it takes no prompts)."""

    backend = "template"
    model = ""

    def __init__(self, *, n_tokens: int = 3):
        super().__init__()
        self.n_tokens = n_tokens

    def describe(self, record: Mapping[str, Any], method: str) -> str | None:
        return template_description(record, method, n=self.n_tokens)

    def complete(self, prompts, **kw):
        raise ConfigError("the template explainer writes descriptions from evidence and takes no prompts; "
                          "use --explainer local or --explainer openai for prompt completions")


# ---------------------------------------------------------------------------------------------
# local: SmolLM2-135M-Instruct through our own generate
# ---------------------------------------------------------------------------------------------
class LocalExplainer(Explainer):
    """A local chat model (default SmolLM2-135M-Instruct) run with featureatlas's `generate`, offline.

    Prompts go through the model's ChatML template; they are sorted by length and generated batch_size at
    a time, left-padded to a multiple of pad_to tokens. One function is compiled per (batch, padded length)
    (~17 s for SmolLM2 on 2 cores), so when a call has at least batch_size prompts every batch is filled
    to batch_size rows (repeating the last prompt), and pad_to is coarse. Sample j uses PRNG key
    fold_in(seed, j).
    """

    backend = "local"

    def __init__(self, lm=None, *, model_name: str = "smollm2-135m", batch_size: int = 8, seed: int = 0,
                 top_logprobs: int = 5, pad_to: int = 64, cache: ResponseCache | None = None):
        super().__init__(cache=cache)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(pad_to, int) or pad_to < 1:
            raise ConfigError(f"pad_to must be an integer >= 1, got {pad_to!r}")
        self.pad_to = pad_to
        self._lm = lm
        self.model_name = model_name
        source = lm.model_id if lm is not None else model_name
        self.model = LOCAL_MODEL_NAME if source == "smollm2-135m" else str(source)
        self.batch_size, self.seed, self.top_logprobs = batch_size, seed, top_logprobs
        self._lock = threading.Lock()

    @property
    def lm(self):
        with self._lock:
            if self._lm is None:
                from featureatlas.activation_store.models import load_model

                self._lm = load_model(self.model_name)
            return self._lm

    def encode(self, messages: list[dict]) -> list[int]:
        lm = self.lm
        ids = list(lm.tokenizer.encode(lm.chat_template(messages, add_generation_prompt=True)))
        bos = lm.tokenizer.bos_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def _generate(self, requests, *, max_tokens, temperature, logprobs):
        import jax
        import numpy as np

        from featureatlas.activation_store.models import Sampling

        lm = self.lm
        eos = lm.config.eos_id
        rows = [self.encode(r.messages) for r in requests]
        answers: list[Answer | None] = [None] * len(requests)
        by_sample: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_sample.setdefault(r.sample, []).append(i)
        for sample, idx in sorted(by_sample.items()):
            idx = sorted(idx, key=lambda i: len(rows[i]))
            key = jax.random.fold_in(jax.random.key(self.seed), sample)
            fill = len(requests) >= self.batch_size  # keep one batch shape across the call
            for b in range(0, len(idx), self.batch_size):
                batch = idx[b:b + self.batch_size]
                batch_rows = [rows[i] for i in batch]
                if fill:
                    batch_rows += [batch_rows[-1]] * (self.batch_size - len(batch))
                t0 = time.perf_counter()
                try:
                    out = lm.generate(lm.params, batch_rows, max_new=max_tokens, pad_to=self.pad_to,
                                      sampling=Sampling(temperature=temperature), key=key, return_logits=logprobs)
                except (ValueError, RuntimeError) as e:  # e.g. a prompt longer than the model's context
                    for i in batch:
                        answers[i] = Answer.failed(f"local generation failed: {e}")
                    continue
                tokens, logits = (out if logprobs else (out, None))
                tokens = np.asarray(tokens)
                seconds = (time.perf_counter() - t0) / len(batch)
                for row, i in enumerate(batch):
                    toks = [int(t) for t in tokens[row]]
                    stop = toks.index(eos) if eos in toks else None
                    gen = toks[:stop] if stop is not None else toks
                    top = None
                    if logits is not None:
                        top = _top_logprobs(np.asarray(logits[row][: len(gen) + (stop is not None)]),
                                            lm.tokenizer, self.top_logprobs)
                    answers[i] = Answer(text=lm.tokenizer.decode(gen),
                                        finish_reason="stop" if stop is not None else "length",
                                        logprobs=top, seconds=seconds, tokens_in=len(rows[i]),
                                        tokens_out=len(gen) + (stop is not None))
                log.info("local explainer: %d prompts, %.1f s each", len(batch), seconds)
        return answers


def _top_logprobs(logits_NxV, tokenizer, k: int) -> list:
    """Per position the k most likely tokens as [[token string, log-prob], ...] (log_softmax of the logits)."""
    import numpy as np

    z = logits_NxV - logits_NxV.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    out = []
    for row in logp:
        best = np.argsort(-row)[:k]
        out.append([[tokenizer.decode([int(t)]), float(row[t])] for t in best])
    return out


# ---------------------------------------------------------------------------------------------
# openai: any OpenAI-compatible chat-completions endpoint
# ---------------------------------------------------------------------------------------------
class _Secret:
    """Holds a credential; its repr/str never show it, and it cannot be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("an API key is not serialised")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110 10.2.3); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Delay before retry `attempt` (0-based): min(cap, Retry-After) when the server sent one, else
    min(cap, base * 2^attempt) * U(0.5, 1) (exponential backoff with jitter)."""
    if retry_after is not None:
        return min(cap, retry_after)
    u = (rng or random).uniform(0.5, 1.0)
    return min(cap, base * 2.0 ** attempt) * u


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class OpenAIExplainer(Explainer):
    """POST {base_url}/chat/completions on an OpenAI-compatible server (see the module docstring).

    base_url: the API root, usually ending in /v1 (e.g. http://127.0.0.1:8080/v1).
    api_key_env: the environment variable holding the key (None or "" for a server that needs none).
    """

    backend = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0, backoff_cap: float = 30.0,
                 concurrency: int = 4, top_logprobs: int = 5, cache: ResponseCache | None = None):
        super().__init__(cache=cache)
        parts = urlsplit(str(base_url))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"--base-url {base_url!r} is not an http(s) URL; pass the API root, "
                              "e.g. http://127.0.0.1:8080/v1")
        if not model:
            raise ConfigError("--model is empty; pass the model name the endpoint serves")
        if not _finite(timeout) or timeout <= 0:
            raise ConfigError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        for name, value in (("backoff", backoff), ("backoff_cap", backoff_cap)):
            if not _finite(value) or value < 0:
                raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        self.base_url = str(base_url).rstrip("/")
        self.model = str(model)
        self.api_key_env = api_key_env or None
        self._key: _Secret | None = None
        if self.api_key_env:
            value = os.environ.get(self.api_key_env, "")
            if not value.strip():
                raise MissingAPIKeyError(
                    f"the API key environment variable {self.api_key_env} is not set or empty; export "
                    f"{self.api_key_env}=<key> before running, or name another variable with --api-key-env "
                    "(an empty --api-key-env sends no key, for a local server that needs none)")
            self._key = _Secret(value.strip())
        self.timeout, self.max_retries = float(timeout), max_retries
        self.backoff, self.backoff_cap = float(backoff), float(backoff_cap)
        self.concurrency, self.top_logprobs = concurrency, top_logprobs
        self._client = None
        self._client_lock = threading.Lock()
        self._checked = False

    def __repr__(self) -> str:
        key = f"${self.api_key_env}" if self.api_key_env else None
        return f"OpenAIExplainer(base_url={self.base_url!r}, model={self.model!r}, api_key_env={key!r})"

    # ---- plumbing ---------------------------------------------------------------------------
    @property
    def client(self):
        import httpx

        with self._client_lock:
            if self._client is None:
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout),
                    limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
                    follow_redirects=False)
            return self._client

    def close(self) -> None:
        """Close the connection pool (a later call opens a new one)."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> "OpenAIExplainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key is not None:
            h["Authorization"] = "Bearer " + self._key.reveal()
        return h

    def _scrub(self, text: str) -> str:
        """Text safe to show: the key (if a server echoed it) replaced by ***."""
        text = str(text)
        if self._key is not None and self._key.reveal():
            text = text.replace(self._key.reveal(), "***")
        return text

    def _snippet(self, resp) -> str:
        try:
            body = resp.text
        except Exception:  # noqa: BLE001 - undecodable body
            body = repr(resp.content[:200])
        body = " ".join(body.split())
        return self._scrub(body[:200] + ("..." if len(body) > 200 else ""))

    # ---- endpoint check ---------------------------------------------------------------------
    def check(self) -> None:
        """Probe the endpoint once: GET /models, or a 1-token chat completion when /models is not served.

        Raises EndpointUnreachableError (nothing listening / no answer), EndpointResponseError (non-JSON
        answers, not an OpenAI-compatible API, the key refused)."""
        if self._checked:
            return
        import httpx

        def ask(method: str, path: str, body=None):
            url = self.base_url + path
            try:
                return self.client.request(method, url, headers=self._headers(), json=body)
            except httpx.TimeoutException:
                raise EndpointUnreachableError(
                    f"the endpoint {self.base_url} did not answer within {self.timeout:g} s; check that the server "
                    "is running and not overloaded, or raise --timeout") from None
            except httpx.TransportError as e:
                raise EndpointUnreachableError(
                    f"cannot reach the endpoint {self.base_url} ({type(e).__name__}); check that the server is "
                    "running and listening there and that --base-url is right") from None

        def refused(resp) -> bool:
            if resp.status_code in (401, 403):
                who = f"the key in ${self.api_key_env}" if self.api_key_env else "a request without a key"
                raise EndpointResponseError(
                    f"the endpoint {self.base_url} refused {who} (HTTP {resp.status_code}); check the key "
                    "and that it is allowed to use this model")
            return False

        def json_or_none(resp):
            try:
                return resp.json()
            except ValueError:
                return None

        resp = ask("GET", "/models")
        refused(resp)
        if resp.status_code == 200:
            if json_or_none(resp) is None:
                raise EndpointResponseError(
                    f"{self.base_url}/models answered HTTP 200 with non-JSON content "
                    f"({resp.headers.get('content-type', 'no content type')}): {self._snippet(resp)!r}; --base-url "
                    "must be the root of an OpenAI-compatible API, usually ending in /v1")
            self._checked = True
            return
        probe = {"model": self.model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1,
                 "temperature": 0.0}
        resp = ask("POST", "/chat/completions", probe)
        refused(resp)
        data = json_or_none(resp)
        if resp.status_code == 429 or resp.status_code >= 500:
            self._checked = True  # reachable but busy: requests retry on their own
            return
        if resp.status_code != 200 or not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            kind = "non-JSON content" if data is None else "JSON without 'choices'"
            raise EndpointResponseError(
                f"{self.base_url}/chat/completions answered HTTP {resp.status_code} with {kind}: "
                f"{self._snippet(resp)!r}; --base-url must be the root of an OpenAI-compatible API "
                "(usually ending in /v1) and --model a model it serves")
        self._checked = True

    # ---- requests ---------------------------------------------------------------------------
    def _body(self, messages, *, max_tokens, temperature, logprobs, sample) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "n": 1}
        if temperature > 0:
            body["seed"] = sample
        if logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        return body

    def _parse(self, resp, seconds: float) -> Answer:
        try:
            data = resp.json()
        except ValueError:
            return Answer.failed(f"malformed JSON in the reply (HTTP {resp.status_code}): {self._snippet(resp)!r}",
                                 seconds)
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"]
            if not isinstance(content, str):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            return Answer.failed(f"the reply lacks choices[0].message.content: {self._snippet(resp)!r}", seconds)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        top = None
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            try:
                top = [[[str(t["token"]), float(t["logprob"])] for t in (pos.get("top_logprobs") or [pos])]
                       for pos in lp["content"]]
            except (KeyError, TypeError, ValueError, AttributeError):
                top = None
        finish = choice.get("finish_reason")
        return Answer(text=content, finish_reason=finish if isinstance(finish, str) else None, logprobs=top,
                      seconds=seconds, tokens_in=int(usage.get("prompt_tokens") or 0),
                      tokens_out=int(usage.get("completion_tokens") or 0))

    def _post(self, body: dict) -> Answer:
        """One request with retries (see the module docstring); never raises for a server's misbehaviour."""
        import httpx

        url = self.base_url + "/chat/completions"
        t0 = time.perf_counter()
        error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = self.client.post(url, headers=self._headers(), json=body)
            except httpx.TimeoutException as e:
                error = f"timed out after {self.timeout:g} s ({type(e).__name__})"
            except httpx.TransportError as e:  # refused, reset, or a reply cut mid-body (RemoteProtocolError)
                error = self._scrub(f"{type(e).__name__}: {e}")
            else:
                if resp.status_code == 429 or resp.status_code >= 500:
                    error = f"HTTP {resp.status_code}: {self._snippet(resp)!r}"
                    retry_after = retry_after_seconds(resp.headers.get("retry-after"))
                elif resp.status_code >= 400:
                    return Answer.failed(f"HTTP {resp.status_code}: {self._snippet(resp)!r}",
                                         time.perf_counter() - t0)
                else:
                    return self._parse(resp, time.perf_counter() - t0)
            if attempt < self.max_retries:
                delay = backoff_delay(attempt, self.backoff, self.backoff_cap, retry_after)
                log.warning("%s: %s; retry %d/%d in %.2f s", url, error, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        return Answer.failed(f"{error} (gave up after {self.max_retries + 1} attempts)", time.perf_counter() - t0)

    def _generate(self, requests, *, max_tokens, temperature, logprobs):
        bodies = [self._body(r.messages, max_tokens=max_tokens, temperature=temperature, logprobs=logprobs,
                             sample=r.sample) for r in requests]
        _ = self.client
        if self.concurrency == 1 or len(bodies) == 1:
            return [self._post(b) for b in bodies]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency,
                                                   thread_name_prefix="featureatlas-llm") as pool:
            return list(pool.map(self._post, bodies))


def make_explainer(kind: str, **kw) -> Explainer:
    """`template` / `local` / `openai` with the backend's keyword arguments."""
    if kind == "template":
        return TemplateExplainer(**kw)
    if kind == "local":
        return LocalExplainer(**kw)
    if kind == "openai":
        return OpenAIExplainer(**kw)
    raise ConfigError(f"unknown explainer {kind!r}; choose from {', '.join(EXPLAINERS)}")


# ---------------------------------------------------------------------------------------------
# describe_features
# ---------------------------------------------------------------------------------------------
@dataclass
class Described:
    """What `describe_features` made, aligned with its records."""

    descriptions: list
    """Per record: kept descriptions then new ones (only successful ones; the record's new "descriptions")."""
    failures: list
    """Per record: this call's failed entries {"failed": true, "error", "method", ...} (never descriptions)."""

    n_new: int = 0
    """New descriptions made by this call (successful ones)."""

    def __iter__(self):  # descriptions, failures = describe_features(...)
        return iter((self.descriptions, self.failures))


def description_key(d: Mapping[str, Any]) -> tuple:
    """What makes two descriptions the same slot: (method, explainer, model, prompt_method, sample)."""
    return (d.get("method"), d.get("explainer"), d.get("model", ""), d.get("prompt_method"), int(d.get("sample", 0)))


def is_failed(d: Mapping[str, Any]) -> bool:
    return bool(d.get("failed"))


def _prompt_method(explainer: Explainer, method: str) -> str:
    return TEMPLATE_VERSION if explainer.backend == "template" else P.PROMPT_VERSIONS[method]


def _entry(explainer: Explainer, method: str, sample: int, **fields) -> dict:
    return {"method": method, "explainer": explainer.backend, "model": explainer.model,
            "prompt_method": _prompt_method(explainer, method), "sample": sample, **fields}


def _failed(explainer: Explainer, method: str, sample: int, error: str) -> dict:
    return _entry(explainer, method, sample, failed=True, error=str(error))


def _described(explainer, method, sample, text, evidence, seconds=0.0, tokens_in=0, tokens_out=0) -> dict:
    d = _entry(explainer, method, sample, text=text, evidence=evidence, seconds=round(float(seconds), 4),
               tokens_in=int(tokens_in), tokens_out=int(tokens_out))
    return {k: d[k] for k in ("text", "method", "explainer", "model", "prompt_method", "evidence", "seconds",
                              "tokens_in", "tokens_out", "sample")}


def _template_evidence(record: Mapping[str, Any], method: str) -> dict:
    ev: dict = {}
    if method in ("maxact", "ensemble-raw", "ensemble-concat"):
        ev.update(n_examples=len(_peaks(record)), split="explain")
    if method in ("vocabproj", "ensemble-raw", "ensemble-concat") and (record.get("vocab_proj") or {}).get("top"):
        ev["vocabproj"] = True
    if method in ("tokenchange", "ensemble-concat") and record.get("token_change"):
        ev["tokenchange"] = True
    return ev


def describe_features(records: Sequence[Mapping[str, Any]], explainer: Explainer, methods: Sequence[str] = ("maxact",),
                      *, k: int = 1, cache: ResponseCache | None = None, temperature: float | None = None,
                      max_tokens: int = 64, prompt_config: PromptConfig | None = None,
                      existing: Sequence[Sequence[Mapping[str, Any]]] | None = None) -> Described:
    """Describe each live feature with each method; per record, its descriptions after this call and the
    failures of this call.

    records: feature records (features.jsonl schema); dead ones (`dead: true`) are returned unchanged.
    methods: any of prompts.METHODS. `ensemble-concat` joins the maxact, vocabproj and tokenchange
        descriptions of the same explainer and sample, which are made too when missing.
    k: best-of-k samples per feature and method (sample 0..k-1), at `temperature` (default 0 for k = 1,
        0.7 for k > 1; k > 1 needs temperature > 0). The template explainer is deterministic: k is 1.
    existing: the description lists to complete (default: each record's "descriptions"). A description
        already there for the same (method, explainer, model, prompt_method, sample) is kept and not
        asked again; earlier failed entries are dropped and retried.
    Returns `Described`: `descriptions[i]`, the kept descriptions of record i followed by the new ones (what
    its "descriptions" field should become); `failures[i]`, this call's failed entries for record i,
    {"failed": true, "error", "method", "explainer", "model", "prompt_method", "sample"}: a failed call is
    recorded there, never as a description, and a rerun asks for it again.
    """
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ConfigError(f"no description method given; choose from {', '.join(P.METHODS)}")
    bad = [m for m in methods if m not in P.METHODS]
    if bad:
        raise ConfigError(f"unknown description method {bad[0]!r}; choose from {', '.join(P.METHODS)}")
    if "ensemble-concat" in methods:
        methods = methods + list(P.CONCAT_PARTS)
    methods = [m for m in P.METHODS if m in methods]  # canonical order: the parts before their concat
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k (best-of-k samples) must be an integer >= 1, got {k!r}")
    template = explainer.backend == "template"
    if template:
        k = 1
    if temperature is None:
        temperature = 0.0 if k == 1 else 0.7
    if k > 1 and temperature <= 0:
        raise ConfigError(f"best-of-k with k={k} needs temperature > 0 (identical greedy samples otherwise)")
    cfg = (prompt_config or PromptConfig()).validate()
    if existing is not None and len(existing) != len(records):
        raise ConfigError(f"existing has {len(existing)} description lists for {len(records)} records")

    kept: list[list[dict]] = []
    new: list[list[dict]] = [[] for _ in records]
    have: list[set] = []
    for i, rec in enumerate(records):
        prior = existing[i] if existing is not None else (rec.get("descriptions") or [])
        keep = [dict(d) for d in prior if not is_failed(d)]
        kept.append(keep)
        have.append({description_key(d) for d in keep})

    def missing(i: int, method: str, sample: int) -> bool:
        slot = (method, explainer.backend, explainer.model, _prompt_method(explainer, method), sample)
        return not records[i].get("dead") and slot not in have[i]

    samples = range(k)
    direct = [m for m in methods if m != "ensemble-concat"]
    if template:
        for i, rec in enumerate(records):
            for method in direct:
                if not missing(i, method, 0):
                    continue
                t0 = time.perf_counter()
                text = template_description(rec, method, n=getattr(explainer, "n_tokens", 3))
                new[i].append(_described(explainer, method, 0, text, _template_evidence(rec, method),
                                          time.perf_counter() - t0) if text else
                              _failed(explainer, method, 0, f"the record has no evidence for {method}"))
    else:
        for sample in samples:
            jobs, prompts = [], []
            for i, rec in enumerate(records):
                for method in direct:
                    if not missing(i, method, sample):
                        continue
                    try:
                        messages, evidence = P.build_prompt(rec, method, cfg)
                    except MissingEvidence as e:
                        new[i].append(_failed(explainer, method, sample, str(e)))
                        continue
                    jobs.append((i, method, evidence))
                    prompts.append(messages)
            if not prompts:
                continue
            answers = explainer.complete(prompts, max_tokens=max_tokens, temperature=temperature,
                                         first_sample=sample, cache=cache)
            for (i, method, evidence), ans in zip(jobs, answers):
                if not ans.ok:
                    new[i].append(_failed(explainer, method, sample, ans.error or "the call failed"))
                    continue
                text = P.parse_description(ans.text, truncated=ans.finish_reason == "length", max_chars=cfg.max_chars)
                if text is None:
                    why = "cut off by max_tokens before a sentence ended" if ans.finish_reason == "length" else "empty"
                    new[i].append(_failed(explainer, method, sample, f"no description in the answer ({why})"))
                    continue
                if P.copies_worked_example(text):
                    new[i].append(_failed(explainer, method, sample, "the answer repeats the prompt's worked example"))
                    continue
                new[i].append(_described(explainer, method, sample, text, evidence, ans.seconds, ans.tokens_in,
                                         ans.tokens_out))
    if "ensemble-concat" in methods:
        for i, rec in enumerate(records):
            for sample in samples:
                if not missing(i, "ensemble-concat", sample):
                    continue
                texts = {}
                for d in kept[i] + new[i]:
                    m = d.get("method")
                    if m in P.CONCAT_PARTS and not is_failed(d) and description_key(d) == (
                            m, explainer.backend, explainer.model, _prompt_method(explainer, m), sample):
                        texts.setdefault(m, d["text"])
                text = P.concat_descriptions(texts)
                new[i].append(_described(explainer, "ensemble-concat", sample, text,
                                         {"from": [m for m in P.CONCAT_PARTS if m in texts]}) if text else
                              _failed(explainer, "ensemble-concat", sample, "no separate description to join"))
    order = {m: j for j, m in enumerate(P.METHODS)}
    for add in new:  # per sample in method order, the concat entries (which need every sample's parts) last
        add.sort(key=lambda d: (d["method"] == "ensemble-concat", d["sample"], order[d["method"]]))
    n_new = sum(len(x) for x in new)
    n_fail = sum(is_failed(d) for x in new for d in x)
    if n_new:
        log.info("describe (%s%s): %d new entries, %d failed", explainer.backend,
                 f" {explainer.model}" if explainer.model else "", n_new, n_fail)
    return Described([keep + [d for d in add if not is_failed(d)] for keep, add in zip(kept, new)],
                     [[d for d in add if is_failed(d)] for add in new], n_new - n_fail)


__all__ = [
    "Answer", "Explainer", "TemplateExplainer", "LocalExplainer", "OpenAIExplainer", "ResponseCache", "Request",
    "MissingAPIKeyError", "EndpointUnreachableError", "EndpointResponseError", "template_description",
    "describe_features", "Described", "make_explainer", "description_key", "is_failed", "backoff_delay",
    "retry_after_seconds",
    "as_messages", "EXPLAINERS", "TEMPLATE_VERSION",
]
