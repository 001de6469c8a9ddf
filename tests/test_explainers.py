"""Explainers: the OpenAI-compatible client against a loopback server of our own, the response cache,
prompt builders (golden strings), the template explainer, describe_features, and the local SmolLM2 backend."""
from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time

import pytest

from featureatlas.activation_store.errors import FeatureAtlasError
from featureatlas.eval import prompts as P
from featureatlas.eval.explainers import (
    EndpointResponseError, EndpointUnreachableError, LocalExplainer, MissingAPIKeyError, OpenAIExplainer,
    ResponseCache, TemplateExplainer, backoff_delay, describe_features, retry_after_seconds, template_description,
)

KEY_ENV = "FEATUREATLAS_TEST_LLM_KEY"
KEY = "sk-fa-TEST-7c1e9b42d0a5f3-NEVER-WRITE-ME"


# ---------------------------------------------------------------------------------------------
# A loopback OpenAI-compatible server whose behaviour per chat request is scripted
# ---------------------------------------------------------------------------------------------
class FakeLLM:
    """http.server on 127.0.0.1:<free port>. `script`: behaviours consumed one per chat request (the last
    one repeats). Behaviours: "ok", "sleep", "malformed", "missing", "truncated", "echo500", "length",
    ("status", code, headers). `html=True`: every path answers an HTML page; `refuse=401`: every request
    is refused with that status."""

    def __init__(self, script=("ok",), *, html=False, models=True, sleep=1.0, refuse=None):
        self.script, self.html, self.models, self.sleep, self.refuse = list(script), html, models, sleep, refuse
        self.chat_requests = 0
        self.auth_headers: list[str] = []
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def send(self, code, body: bytes, ctype="application/json", headers=(), length=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if owner.refuse:
                    return self.send(owner.refuse, b'{"error": {"message": "invalid api key"}}')
                if owner.html:
                    return self.send(200, b"<html><body>It works!</body></html>", "text/html")
                if self.path.rstrip("/").endswith("/models") and owner.models:
                    return self.send(200, json.dumps({"object": "list", "data": [{"id": "fake"}]}).encode())
                return self.send(404, b'{"error": "not found"}')

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                if owner.refuse:
                    return self.send(owner.refuse, b'{"error": {"message": "invalid api key"}}')
                if owner.html:
                    return self.send(200, b"<html><body>It works!</body></html>", "text/html")
                if not self.path.endswith("/chat/completions"):
                    return self.send(404, b'{"error": "not found"}')
                if body.get("max_tokens") == 1 and body["messages"][-1]["content"] == "Say OK.":
                    return self.send(200, json.dumps(owner.reply("OK")).encode())  # the endpoint probe
                with owner.lock:
                    i = owner.chat_requests
                    owner.chat_requests += 1
                    owner.auth_headers.append(self.headers.get("Authorization", ""))
                    owner.bodies.append(body)
                    what = owner.script[min(i, len(owner.script) - 1)]
                try:
                    self.behave(what, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def behave(self, what, body):
                user = body["messages"][-1]["content"]
                if what == "ok":
                    return self.send(200, json.dumps(owner.reply(owner.answer_for(user))).encode())
                if what == "length":
                    return self.send(200, json.dumps(owner.reply("Description: fires on the word", "length")).encode())
                if what == "sleep":
                    time.sleep(owner.sleep)
                    return self.send(200, json.dumps(owner.reply("late")).encode())
                if what == "malformed":
                    return self.send(200, b'{"choices": [{"message": {"content": "Descr')
                if what == "missing":
                    return self.send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
                if what == "truncated":  # promises 400 bytes, sends 30, closes
                    self.send(200, json.dumps(owner.reply("x" * 300)).encode()[:30], length=400)
                    self.close_connection = True
                    return
                if what == "echo500":  # a misbehaving server that echoes the credentials back
                    return self.send(500, f"internal error for {self.headers.get('Authorization')}".encode(),
                                     "text/plain")
                _, code, headers = what
                return self.send(code, json.dumps({"error": {"message": f"status {code}"}}).encode(),
                                 headers=list(headers.items()))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def answer_for(user: str) -> str:
        return f"Description: feature number {sum(map(ord, user)) % 9973}."

    @staticmethod
    def reply(content: str, finish: str = "stop") -> dict:
        return {"id": "c1", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server_factory():
    made = []

    def make(*args, **kw):
        made.append(FakeLLM(*args, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV


def client(server, **kw):
    kw.setdefault("api_key_env", KEY_ENV)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_retries", 2)
    return OpenAIExplainer(server.url, "fake-model", **kw)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible client
# ---------------------------------------------------------------------------------------------
def test_success_sends_key_and_parses_reply(server_factory, key_env):
    srv = server_factory(["ok"])
    ex = client(srv)
    [a] = ex.complete(["What is 2+2?"], max_tokens=16, temperature=0.0)
    assert a.ok and a.text == FakeLLM.answer_for("What is 2+2?")
    assert (a.finish_reason, a.tokens_in, a.tokens_out, a.cached) == ("stop", 11, 7, False)
    assert a.seconds > 0
    assert srv.auth_headers == [f"Bearer {KEY}"]
    assert srv.bodies[0]["model"] == "fake-model" and srv.bodies[0]["max_tokens"] == 16
    assert srv.bodies[0]["messages"] == [{"role": "user", "content": "What is 2+2?"}]


def test_n_samples_and_concurrency(server_factory, key_env):
    srv = server_factory(["ok"])
    ex = client(srv, concurrency=3)
    answers = ex.complete([f"prompt {i}" for i in range(5)], max_tokens=8, temperature=0.7, n=2)
    assert len(answers) == 10 and all(a.ok for a in answers)
    assert [a.text for a in answers[::2]] == [FakeLLM.answer_for(f"prompt {i}") for i in range(5)]
    assert srv.chat_requests == 10
    assert sorted(b["seed"] for b in srv.bodies) == [0] * 5 + [1] * 5  # sample index travels as the seed


def test_timeout_is_retried_then_recorded_as_failed(server_factory, key_env):
    srv = server_factory(["sleep"], sleep=1.5)
    ex = client(srv, timeout=0.3, max_retries=1)
    t0 = time.perf_counter()
    [a] = ex.complete(["slow"], max_tokens=8)
    assert not a.ok and "timed out" in a.error and "2 attempts" in a.error
    assert srv.chat_requests == 2
    assert time.perf_counter() - t0 < 3.0


def test_429_with_retry_after_then_200(server_factory, key_env):
    srv = server_factory([("status", 429, {"Retry-After": "0.4"}), "ok"])
    ex = client(srv, backoff=20.0, backoff_cap=30.0)  # the jittered backoff would wait >= 10 s: Retry-After wins
    t0 = time.perf_counter()
    [a] = ex.complete(["busy?"], max_tokens=8)
    took = time.perf_counter() - t0
    assert a.ok and srv.chat_requests == 2
    assert 0.4 <= took < 5.0


def test_500_then_200_is_retried(server_factory, key_env):
    srv = server_factory([("status", 500, {}), ("status", 503, {}), "ok"])
    [a] = client(srv, max_retries=3).complete(["flaky"], max_tokens=8)
    assert a.ok and srv.chat_requests == 3


def test_retries_give_up_and_4xx_is_not_retried(server_factory, key_env):
    srv = server_factory([("status", 502, {})])
    [a] = client(srv, max_retries=2).complete(["down"], max_tokens=8)
    assert not a.ok and "HTTP 502" in a.error and "3 attempts" in a.error and srv.chat_requests == 3
    srv2 = server_factory([("status", 400, {})])
    [b] = client(srv2, max_retries=2).complete(["bad"], max_tokens=8)
    assert not b.ok and "HTTP 400" in b.error and srv2.chat_requests == 1


@pytest.mark.parametrize("what, words", [("malformed", "malformed JSON"), ("missing", "lacks choices")])
def test_malformed_or_incomplete_json_fails_that_prompt(server_factory, key_env, tmp_path, what, words):
    srv = server_factory([what, "ok"])
    cache = ResponseCache(tmp_path / "cache")
    a, b = client(srv, concurrency=1).complete(["first", "second"], max_tokens=8, cache=cache)
    assert not a.ok and words in a.error and a.text is None
    assert b.ok
    assert srv.chat_requests == 2  # a 200 with a bad body is not retried
    assert len(cache) == 1  # only the good answer is cached


def test_truncated_reply_is_a_failure_not_a_description(server_factory, key_env, tmp_path):
    srv = server_factory(["truncated"])
    cache = ResponseCache(tmp_path / "cache")
    [a] = client(srv, max_retries=1).complete(["cut"], max_tokens=8, cache=cache)
    assert not a.ok and "RemoteProtocolError" in a.error
    assert srv.chat_requests == 2 and len(cache) == 0
    recs = [tiny_record()]
    out = describe_features(recs, client(srv, max_retries=0), ["vocabproj"], cache=cache)
    assert out.descriptions == [[]] and out.n_new == 0
    assert out.failures[0] == [{"method": "vocabproj", "explainer": "openai", "model": "fake-model",
                                "prompt_method": "vocabproj-v1", "sample": 0, "failed": True,
                                "error": out.failures[0][0]["error"]}]


def test_answer_cut_by_max_tokens(server_factory, key_env):
    srv = server_factory(["length"])
    out = describe_features([tiny_record()], client(srv), ["maxact"])
    assert out.descriptions == [[]] and "max_tokens" in out.failures[0][0]["error"]


def test_response_cache_prevents_repeat_calls(server_factory, key_env, tmp_path):
    srv = server_factory(["ok"])
    cache = ResponseCache(tmp_path / "cache")
    first = client(srv).complete(["a", "b"], max_tokens=8, cache=cache)
    assert srv.chat_requests == 2 and len(cache) == 2
    again = client(srv).complete(["a", "b"], max_tokens=8, cache=cache)  # a new client, same cache
    assert srv.chat_requests == 2
    assert [a.text for a in again] == [a.text for a in first] and all(a.cached for a in again)
    client(srv).complete(["a"], max_tokens=9, cache=cache)  # other params: a new request
    client(srv).complete(["a"], max_tokens=8, temperature=0.5, cache=cache)
    assert srv.chat_requests == 4
    # describe_features: a rerun costs nothing, and works with the server gone
    recs = [tiny_record()]
    d1 = describe_features(recs, client(srv), ["maxact", "vocabproj"], cache=cache)
    n = srv.chat_requests
    srv.close()
    d2 = describe_features(recs, client(srv), ["maxact", "vocabproj"], cache=cache)
    assert srv.chat_requests == n and d1 == d2


def test_key_never_written_to_files_logs_or_messages(server_factory, key_env, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    srv = server_factory(["ok", "echo500", "echo500", "malformed", "ok"])
    cache = ResponseCache(tmp_path / "cache")
    ex = client(srv, concurrency=1, max_retries=1)
    recs = [tiny_record(), tiny_record()]
    out = describe_features(recs, ex, ["maxact", "vocabproj"], cache=cache)
    errors = [d["error"] for ds in out.failures for d in ds]
    assert any("***" in e for e in errors)  # the echoed credential was scrubbed
    assert len(cache) >= 1
    texts = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    texts += [caplog.text, json.dumps([out.descriptions, out.failures]), repr(ex), str(vars(ex)), *capsys.readouterr()]
    with pytest.raises(EndpointUnreachableError) as info:
        OpenAIExplainer(f"http://127.0.0.1:{closed_port()}/v1", "m", api_key_env=KEY_ENV).complete(["x"], max_tokens=1)
    texts.append(str(info.value))
    assert texts and not [t for t in texts if KEY in t]
    assert "NEVER-WRITE-ME" not in "".join(texts)
    assert srv.auth_headers[0] == f"Bearer {KEY}"  # it was really sent


def test_missing_key_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(MissingAPIKeyError, match=KEY_ENV) as info:
        OpenAIExplainer("http://127.0.0.1:1/v1", "m", api_key_env=KEY_ENV)
    assert isinstance(info.value, FeatureAtlasError)
    monkeypatch.setenv(KEY_ENV, "  ")
    with pytest.raises(MissingAPIKeyError, match="not set or empty"):
        OpenAIExplainer("http://127.0.0.1:1/v1", "m", api_key_env=KEY_ENV)
    OpenAIExplainer("http://127.0.0.1:1/v1", "m", api_key_env=None)  # a keyless local server is fine


def test_unreachable_endpoint_raises_before_anything_is_written(key_env, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    cache = ResponseCache(tmp_path / "cache")
    ex = OpenAIExplainer(url, "m", api_key_env=KEY_ENV, timeout=2.0)
    with pytest.raises(EndpointUnreachableError, match="check that the server is running") as info:
        describe_features([tiny_record()], ex, ["maxact"], cache=cache)
    assert url in str(info.value) and isinstance(info.value, FeatureAtlasError)
    assert not (tmp_path / "cache").exists()


def test_non_json_endpoint_raises(server_factory, key_env, tmp_path):
    srv = server_factory(html=True)
    with pytest.raises(EndpointResponseError, match="non-JSON") as info:
        client(srv).complete(["x"], max_tokens=4, cache=ResponseCache(tmp_path / "cache"))
    assert "/v1" in str(info.value) and not (tmp_path / "cache").exists()
    # a server without /models is probed with a 1-token chat request instead
    srv2 = server_factory(["ok"], models=False)
    [a] = client(srv2).complete(["x"], max_tokens=4)
    assert a.ok and srv2.chat_requests == 1


def test_refused_key_raises(server_factory, key_env):
    srv = server_factory(refuse=401)
    with pytest.raises(EndpointResponseError, match=f"refused the key in \\${KEY_ENV}"):
        client(srv).complete(["x"], max_tokens=4)


def test_retry_after_and_backoff():
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("-3") == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    import random

    rng = random.Random(0)
    for attempt in range(8):
        d = backoff_delay(attempt, 0.5, 4.0, rng=rng)
        assert 0.5 * min(4.0, 0.5 * 2 ** attempt) <= d <= min(4.0, 0.5 * 2 ** attempt)
    assert backoff_delay(0, 0.5, 4.0, retry_after=100.0) == 4.0


def test_bad_settings_are_config_errors(key_env):
    for kw in ({"timeout": 0}, {"max_retries": -1}, {"concurrency": 0}, {"backoff": float("nan")}):
        with pytest.raises(FeatureAtlasError):
            OpenAIExplainer("http://127.0.0.1:1/v1", "m", api_key_env=KEY_ENV, **kw)
    with pytest.raises(FeatureAtlasError, match="http"):
        OpenAIExplainer("127.0.0.1:1/v1", "m", api_key_env=KEY_ENV)
    ex = OpenAIExplainer("http://127.0.0.1:1/v1", "m", api_key_env=KEY_ENV)
    with pytest.raises(FeatureAtlasError, match="max_tokens"):
        ex.complete(["x"], max_tokens=0)
    with pytest.raises(FeatureAtlasError, match="chat message"):
        ex.complete([[{"role": "user"}]], max_tokens=1)


# ---------------------------------------------------------------------------------------------
# Prompt builders (golden strings) and the parser
# ---------------------------------------------------------------------------------------------
def tiny_record() -> dict:
    return {
        "schema": "featureatlas-features/1", "id": "sae/7", "dictionary": "sae", "index": 7, "hook": "resid_post.3",
        "dead": False,
        "examples": {
            "top": [{"context": 3, "start": 0, "tokens": ["We", " met", " in", " Rome", "\n"],
                     "acts": [0.0, 0.5, 1.0, 5.0, 2.0], "max_pos": 3},
                    {"context": 9, "start": 4, "tokens": [" Oslo", " and", " Bern"],
                     "acts": [4.0, 0.0, 3.5], "max_pos": 0}],
            "quantiles": [[{"context": 11, "start": 0, "tokens": ["a", " Nice", " day"], "acts": [0.0, 1.2, 0.0],
                            "max_pos": 1}]],
            "random": []},
        "vocab_proj": {"top": [[" Italy", 2.0], [" Norway", 1.5], [" Swiss", 1.0]],
                       "bottom": [[" the", -1.0], ["<script>", -0.5]]},
        "token_change": {"clamp": 10.0, "pos": {"up": [[" Italy", 0.9]], "down": [[" and", -0.2]]},
                         "neg": {"up": [], "down": [[" Italy", -0.4]]}},
        "descriptions": [], "scores": [],
    }


MAXACT_EVIDENCE = (
    'Example 1: We met in<< Rome\\n>>\n'
    'Activations: (" met", 1), (" in", 2), (" Rome", 10), ("\\n", 4)\n'
    'Example 2: << Oslo>> and<< Bern>>\n'
    'Activations: (" Oslo", 8), (" Bern", 7)'
)
VOCAB_EVIDENCE = ('Tokens the feature promotes most: " Italy", " Norway", " Swiss"\n'
                  'Tokens the feature suppresses most: " the", "<script>"')
CHANGE_EVIDENCE = ('With the feature set to 10 at every position:\n'
                   '  more likely next tokens: " Italy"\n'
                   '  less likely next tokens: " and"\n'
                   'With the feature set to -10 at every position:\n'
                   '  more likely next tokens: none\n'
                   '  less likely next tokens: " Italy"')


def test_maxact_prompt_golden():
    msgs, ev = P.build_prompt(tiny_record(), "maxact")
    assert ev == {"n_examples": 2, "split": "explain"}
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[3]["content"] == (MAXACT_EVIDENCE + "\n\nWhat does this feature fire on? "
                                  'Answer with one short sentence after "Description:".')
    assert msgs[1]["content"].startswith("Example 1: I flew to<< Paris>> last week.\n"
                                         'Activations: (" Paris", 10), (" last", 1)\n')
    assert msgs[2]["content"] == 'Description: names of French cities such as "Paris" and "Lyon".'
    assert "<<like this>>" in msgs[0]["content"] and "0 to 10" in msgs[0]["content"]
    # quantile examples and the highlight fraction
    msgs, ev = P.build_prompt(tiny_record(), "maxact", P.PromptConfig(n_examples=1, n_quantile=1, highlight=0.9))
    assert ev["n_examples"] == 2
    assert msgs[3]["content"].startswith('Example 1: We met in<< Rome>>\\n\nActivations: (" met", 1), (" in", 2), '
                                         '(" Rome", 10), ("\\n", 4)\n'
                                         'Example 2: a Nice day\nActivations: (" Nice", 2)\n')


def test_output_prompts_golden():
    msgs, ev = P.build_prompt(tiny_record(), "vocabproj")
    assert ev == {"n_tokens": 5}
    assert msgs[3]["content"] == VOCAB_EVIDENCE + "\n\nWhat does this feature promote? " \
                                                  'Answer with one short sentence after "Description:".'
    msgs, ev = P.build_prompt(tiny_record(), "tokenchange")
    assert ev == {"n_tokens": 3, "clamp": 10.0}
    assert msgs[3]["content"].startswith(CHANGE_EVIDENCE + "\n\nWhat does this feature make the model say?")
    msgs, ev = P.build_prompt(tiny_record(), "vocabproj", P.PromptConfig(n_vocab=1))
    assert msgs[3]["content"].startswith('Tokens the feature promotes most: " Italy"\n'
                                         'Tokens the feature suppresses most: " the"\n\n')


def test_ensemble_raw_prompt_golden():
    msgs, ev = P.build_prompt(tiny_record(), "ensemble-raw")
    assert msgs[3]["content"] == (
        "Input evidence:\n" + MAXACT_EVIDENCE + "\n\nOutput evidence:\n" + VOCAB_EVIDENCE + "\n" + CHANGE_EVIDENCE
        + '\n\nWhat does this feature fire on, and what does it do? '
        'Answer with one short sentence after "Description:".')
    assert ev == {"n_examples": 2, "split": "explain", "vocabproj": {"n_tokens": 5},
                  "tokenchange": {"n_tokens": 3, "clamp": 10.0}}


def test_missing_evidence():
    rec = tiny_record()
    del rec["vocab_proj"], rec["token_change"]
    with pytest.raises(P.MissingEvidence, match="vocab_proj"):
        P.build_prompt(rec, "vocabproj")
    with pytest.raises(P.MissingEvidence, match="output evidence"):
        P.build_prompt(rec, "ensemble-raw")
    rec["examples"]["top"] = []
    with pytest.raises(P.MissingEvidence, match="examples"):
        P.build_prompt(rec, "maxact")


def test_normalise_and_highlight():
    assert P.normalise_acts([0.0, -1.0, 2.5, 5.0, 7.0], 5.0) == [0, 0, 5, 10, 10]
    assert P.normalise_acts([1.0], 0.0) == [0]
    assert P.highlight_window(["a", "b", "c", "d"], [3, 3, 0, 1], 3.0, 0.3) == "<<ab>>c<<d>>"
    assert P.show_token(' "x"\n') == '" \\"x\\"\\n"'


@pytest.mark.parametrize("text, truncated, expected", [
    ("Description: city names.\nMore text", False, "city names."),
    ("Sure! Here it is.\n\ndescription :   **city   names**  ", False, "city names"),
    ("  city names in Europe  ", False, "city names in Europe"),
    ('Description: "city names"', False, "city names"),
    ('Description: "Paris" and "Rome"', False, '"Paris" and "Rome"'),
    ("Description:   \n  ", False, None),
    ("", False, None),
    (None, False, None),
    ("Description: city names. And then the", True, "city names."),
    ("Description: city names and", True, None),
    ("Description: city names\nand more", True, "city names"),
])
def test_parse_description(text, truncated, expected):
    assert P.parse_description(text, truncated=truncated) == expected


def test_parse_description_caps_length():
    out = P.parse_description("Description: " + "word " * 100, max_chars=30)
    assert out == "word word word word word word" and len(out) <= 30


def test_concat_descriptions():
    assert P.concat_descriptions({"maxact": "city names", "vocabproj": "promotes countries.",
                                  "tokenchange": None}) == "Input: City names. Output: Promotes countries."
    assert P.concat_descriptions({}) is None


# ---------------------------------------------------------------------------------------------
# Template explainer and describe_features
# ---------------------------------------------------------------------------------------------
def test_template_descriptions_are_deterministic():
    rec = tiny_record()
    expected = {
        "maxact": 'fires on " Rome", " Oslo"',
        "vocabproj": 'promotes " Italy", " Norway", " Swiss"; suppresses " the", "<script>"',
        "tokenchange": 'amplifying it raises " Italy" and lowers " and"',
        "ensemble-raw": ('fires on " Rome", " Oslo"; promotes " Italy", " Norway", " Swiss"; '
                         'suppresses " the", "<script>"'),
        "ensemble-concat": ('Input: Fires on " Rome", " Oslo". Output: Promotes " Italy", " Norway", " Swiss"; '
                            'suppresses " the", "<script>". Amplifying it raises " Italy" and lowers " and".'),
    }
    for method, text in expected.items():
        assert template_description(rec, method) == text
        assert template_description(json.loads(json.dumps(rec)), method) == text
    rec["examples"]["top"].append({"context": 1, "start": 0, "tokens": [" in", " Rome"], "acts": [0, 3.0],
                                   "max_pos": 1})
    assert template_description(rec, "maxact") == 'fires on " Rome", " Oslo" (often after " in")'
    assert template_description({}, "maxact") is None
    a = describe_features([rec], TemplateExplainer(), ["maxact", "vocabproj"])
    b = describe_features([rec], TemplateExplainer(), ["maxact", "vocabproj"])
    strip = lambda ds: [{k: v for k, v in d.items() if k != "seconds"} for d in ds]  # noqa: E731
    assert strip(a.descriptions[0]) == strip(b.descriptions[0]) and a.failures == [[]]
    assert a.descriptions[0][0] == {"text": 'fires on " Rome", " Oslo" (often after " in")', "method": "maxact",
                       "explainer": "template", "model": "", "prompt_method": "template-v1",
                       "evidence": {"n_examples": 3, "split": "explain"}, "seconds": a.descriptions[0][0]["seconds"],
                       "tokens_in": 0, "tokens_out": 0, "sample": 0}


def test_describe_features_records_failures_and_reruns_fill_only_missing(server_factory, key_env, tmp_path):
    srv = server_factory(["ok", "malformed", "ok"])
    cache = ResponseCache(tmp_path / "cache")
    dead = {"id": "sae/8", "dead": True, "descriptions": []}
    no_output = tiny_record()
    del no_output["vocab_proj"], no_output["token_change"]
    recs = [tiny_record(), dead, no_output]
    ex = client(srv, concurrency=1)
    out = describe_features(recs, ex, ["maxact", "vocabproj"], cache=cache)
    assert out.descriptions[1] == [] and out.failures[1] == []  # dead features are not described
    [good], [failed] = out.descriptions[0], out.failures[0]
    assert good["method"] == "maxact" and good["text"].startswith("feature number ")
    assert {k: good[k] for k in ("explainer", "model", "prompt_method", "evidence", "tokens_in", "tokens_out",
                                 "sample")} == {"explainer": "openai", "model": "fake-model",
                                                "prompt_method": "maxact-v1",
                                                "evidence": {"n_examples": 2, "split": "explain"},
                                                "tokens_in": 11, "tokens_out": 7, "sample": 0}
    assert failed["failed"] and failed["method"] == "vocabproj" and "text" not in failed
    assert out.descriptions[2][0]["text"] and "vocab_proj" in out.failures[2][0]["error"]
    assert srv.chat_requests == 3 and out.n_new == 2
    # rerun with the descriptions stored: only the failed slot is asked again
    schema = pytest.importorskip("featureatlas.eval.schema")
    for rec, descs in zip(recs, out.descriptions):
        rec["descriptions"] = descs
        for j, d in enumerate(descs):
            schema.validate_description(d, rec["id"], f"descriptions[{j}]")
    out2 = describe_features(recs, ex, ["maxact", "vocabproj"], cache=cache)
    assert srv.chat_requests == 4 and out2.failures[0] == [] and out2.n_new == 1
    assert out2.descriptions[0][0] == good and out2.descriptions[0][1]["method"] == "vocabproj"
    # a third run asks nothing (the missing-evidence failure of record 2 costs no call)
    out3 = describe_features(recs, ex, ["maxact", "vocabproj"], existing=out2.descriptions, cache=None)
    assert srv.chat_requests == 4 and out3.descriptions == out2.descriptions and out3.n_new == 0


def test_best_of_k_and_concat(server_factory, key_env):
    srv = server_factory(["ok"])
    out = describe_features([tiny_record()], client(srv), ["ensemble-concat"], k=2)
    methods = [(d["method"], d["sample"]) for d in out.descriptions[0]]
    assert methods == [("maxact", 0), ("vocabproj", 0), ("tokenchange", 0), ("maxact", 1), ("vocabproj", 1),
                       ("tokenchange", 1), ("ensemble-concat", 0), ("ensemble-concat", 1)]
    concat = out.descriptions[0][6]
    assert concat["text"].startswith("Input: Feature number ") and concat["evidence"] == {
        "from": ["maxact", "vocabproj", "tokenchange"]}
    assert all(b["temperature"] == 0.7 for b in srv.bodies) and srv.chat_requests == 6
    with pytest.raises(FeatureAtlasError, match="temperature > 0"):
        describe_features([tiny_record()], client(srv), ["maxact"], k=3, temperature=0.0)
    with pytest.raises(FeatureAtlasError, match="unknown description method 'maxactt'"):
        describe_features([tiny_record()], TemplateExplainer(), ["maxactt"])


def test_template_explainer_takes_no_prompts():
    with pytest.raises(FeatureAtlasError, match="takes no prompts"):
        TemplateExplainer().complete(["x"], max_tokens=4)


# ---------------------------------------------------------------------------------------------
# local: a tiny random model (fast), then the real SmolLM2-135M-Instruct (slow)
# ---------------------------------------------------------------------------------------------
def test_local_backend_batches_samples_logprobs_and_cache(tmp_path):
    from featureatlas.activation_store.models import random_model

    lm = random_model("llama", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_mlp=64, max_ctx=512)
    # three prompts that pad to one length: each batch shape compiles once (~4 s each on 2 cores)
    prompts = ["hi", "hey", [{"role": "user", "content": "yo"}]]
    one = LocalExplainer(lm, batch_size=1).complete(prompts, max_tokens=5)
    many = LocalExplainer(lm, batch_size=3).complete(prompts, max_tokens=5)
    assert [a.text for a in one] == [a.text for a in many]  # left-padded batches = one at a time
    ex = LocalExplainer(lm, batch_size=3)
    assert ex.model == lm.model_id
    for a, p in zip(many, prompts):
        assert a.ok and a.tokens_in == len(ex.encode(P_messages(p))) and 1 <= a.tokens_out <= 5
        assert a.finish_reason in ("stop", "length")
    sampled = [a.text for a in ex.complete(prompts, max_tokens=5, temperature=1.5, n=3)]
    assert len(sampled) == 9 and sampled == [a.text for a in ex.complete(prompts, max_tokens=5, temperature=1.5, n=3)]
    assert len(set(sampled[:3])) > 1  # samples 0, 1, 2 of one prompt draw different keys
    [a] = ex.complete(["hi"], max_tokens=5, logprobs=True)
    assert len(a.logprobs) == a.tokens_out and all(len(pos) == 5 for pos in a.logprobs)
    for pos in a.logprobs:
        lps = [lp for _, lp in pos]
        assert lps == sorted(lps, reverse=True) and lps[0] <= 0.0
    cache = ResponseCache(tmp_path / "cache")
    first = ex.complete(prompts, max_tokens=5, cache=cache)
    assert len(cache) == 3
    offline = LocalExplainer(model_name="no-such-model")
    offline.model = ex.model  # same cache identity, but any model call would fail to load
    again = offline.complete(prompts, max_tokens=5, cache=cache)
    assert [a.text for a in again] == [a.text for a in first] and all(a.cached for a in again)


def P_messages(prompt):
    from featureatlas.eval.explainers import as_messages

    return as_messages(prompt)


# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_smollm2_describes_a_feature(smollm2, tmp_path):
    cache = ResponseCache(tmp_path / "cache")
    ex = LocalExplainer(smollm2, batch_size=4)
    assert ex.model == "smollm2-135m-instruct"
    cfg = P.PromptConfig(n_examples=2, n_vocab=5)
    t0 = time.perf_counter()
    out = describe_features([tiny_record()], ex, ["maxact", "vocabproj"], cache=cache, max_tokens=24,
                            prompt_config=cfg)
    took = time.perf_counter() - t0
    descs = out.descriptions[0]
    assert descs, out
    for d in descs:
        assert d["text"].strip() and d["explainer"] == "local" and d["tokens_in"] > 100 and 0 < d["tokens_out"] <= 24
    assert took < 60, took
    print(f"local explainer: {took:.1f} s;", [d["text"] for d in descs], out.failures)
    # cached: no model call the second time
    t0 = time.perf_counter()
    again = describe_features([tiny_record()], ex, ["maxact", "vocabproj"], cache=cache, max_tokens=24,
                              prompt_config=cfg)
    assert again == out and time.perf_counter() - t0 < 1.0


def test_an_answer_that_parrots_the_worked_example_is_a_failure():
    from featureatlas.eval.prompts import WORKED_ANSWER, copies_worked_example

    assert all(copies_worked_example(a) for a in WORKED_ANSWER.values())
    assert copies_worked_example("France and things France: the country, its language and its cities.")
    assert copies_worked_example("makes the model talk about Gore and not about Germany.")
    assert not copies_worked_example("Words about the French government and Paris politics in news stories.")
    assert not copies_worked_example('fires on " use", " useful"')
