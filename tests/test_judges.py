"""Judges: metrics against scikit-learn and hand-computed values, answer parsing, log-prob reading, description
checks, and the LLM judge against a loopback OpenAI-compatible server (the FakeLLM of test_explainers) whose
answers follow a rule and carry per-token log-probs."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from featureatlas.activation_store.errors import ConfigError, FeatureAtlasError
from featureatlas.eval.explainers import Answer, OpenAIExplainer, ResponseCache, TemplateExplainer
from featureatlas.eval.judges import (
    DescriptionError, LLMJudge, Tally, aligned_distributions, answer_tokens, auroc, binary_metrics, bootstrap_ci,
    check_description, choice_distributions, choice_probability, expected_value, parse_activations, parse_choice,
    parse_labels, pearson,
)
from test_explainers import KEY, KEY_ENV, FakeLLM

_TOKEN = re.compile(r"\s*\d+|\s*[A-Za-z]+|\s*[^\sA-Za-z\d]")


class JudgeLLM(FakeLLM):
    """The loopback server of test_explainers answering by a rule on the last user turn, with log-probs.

    rule(user_text, request_index) -> answer text. Answers are split into tokens like a BPE tokenizer would
    ("\\s*\\d+" is one token, so "10" is one token); each token gets top log-probs from `alts`:
    {token core: [(alternative core, probability), ...]} (the generated core first), else probability 1."""

    def __init__(self, rule, *, alts=None, script=("ok",), logprobs=True):
        self.rule, self.alts, self.with_logprobs = rule, dict(alts or {}), logprobs
        super().__init__(script)

    def answer_for(self, user: str) -> str:
        return self.rule(user, self.chat_requests - 1)

    def reply(self, content: str, finish: str = "stop") -> dict:
        out = FakeLLM.reply(content, finish)
        if self.with_logprobs:
            toks = _TOKEN.findall(content)
            assert "".join(toks) == content
            positions = []
            for tok in toks:
                core = tok.strip(" []")
                alts = self.alts.get(core, [(core, 1.0)])
                top = [{"token": tok.replace(core, a), "logprob": math.log(p)} for a, p in alts]
                positions.append({"token": tok, "logprob": top[0]["logprob"], "top_logprobs": top})
            out["choices"][0]["logprobs"] = {"content": positions}
        return out


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV


@pytest.fixture
def judge_server():
    made = []

    def make(*args, **kw):
        made.append(JudgeLLM(*args, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def llm_judge(server, cache=None, **kw) -> LLMJudge:
    kw.setdefault("concurrency", 1)
    return LLMJudge(OpenAIExplainer(server.url, "fake-model", api_key_env=KEY_ENV, timeout=5.0, backoff=0.01,
                                    max_retries=0, **kw), cache=cache)


def lp(*pairs):
    """Top log-probs of one position from (token, probability) pairs."""
    return [[t, math.log(p)] for t, p in pairs]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
Y_TRUE = [1, 1, 1, 0, 0, 0, 0, 1]
Y_PRED = [1, 0, 1, 0, 1, 0, 0, 1]
SCORE = [0.9, 0.4, 0.8, 0.3, 0.6, 0.2, 0.1, 0.7]


def test_binary_metrics_equal_scikit_learn_and_hand_values():
    m = binary_metrics(Y_TRUE, Y_PRED, SCORE)
    # by hand: TP 3, FN 1, FP 1, TN 3; AUROC: 15 of the 16 (positive, negative) pairs are ordered right
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (3, 1, 1, 3, 8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 3 / 4) / 2)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert m["auroc"] == pytest.approx(15 / 16)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y_TRUE, Y_PRED))
    assert m["precision"] == pytest.approx(precision_score(Y_TRUE, Y_PRED))
    assert m["recall"] == pytest.approx(recall_score(Y_TRUE, Y_PRED))
    assert m["f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED))
    assert m["auroc"] == pytest.approx(roc_auc_score(Y_TRUE, SCORE))
    # an unbalanced draw against scikit-learn
    rng = np.random.default_rng(3)
    yt, yp, s = rng.integers(0, 2, 200), rng.integers(0, 2, 200), rng.random(200)
    m = binary_metrics(yt, yp, s)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yt, yp))
    assert m["f1"] == pytest.approx(f1_score(yt, yp)) and m["auroc"] == pytest.approx(roc_auc_score(yt, s))
    # without a score, AUROC is that of the labels, which equals balanced accuracy
    m = binary_metrics(Y_TRUE, Y_PRED)
    assert m["auroc"] == pytest.approx(m["balanced_accuracy"]) == pytest.approx(roc_auc_score(Y_TRUE, Y_PRED))
    assert auroc([0.9, 0.4, 0.8, 0.7], [0.3, 0.6, 0.2, 0.1]) == pytest.approx(15 / 16)
    assert auroc([1.0], []) is None


def test_binary_metrics_none_where_undefined():
    m = binary_metrics([1, 1, 1], [1, 0, 1], [0.9, 0.2, 0.8])  # one class only
    assert m["balanced_accuracy"] is None and m["auroc"] is None
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3)
    m = binary_metrics([1, 0, 0], [0, 0, 0])  # nothing predicted positive
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] == 0.0 and m["balanced_accuracy"] == 0.5
    m = binary_metrics([0, 0], [0, 0])  # no positive anywhere
    assert m["precision"] is None and m["recall"] is None and m["f1"] is None
    m = binary_metrics([], [])
    assert m["n"] == 0 and m["accuracy"] is None and m["balanced_accuracy"] is None
    with pytest.raises(ValueError):
        binary_metrics([0, 2], [0, 1])


def test_pearson_and_bootstrap():
    x, y = [1, 2, 3, 4], [2, 4, 5, 9]
    mx, my = 2.5, 5.0
    hand = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert pearson(x, y) == pytest.approx(hand)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and pearson([1], [2]) is None
    vals = [0.2, 0.4, 0.6, 0.8, None, 1.0]
    lo, hi = bootstrap_ci(vals, n_boot=2000, seed=0)
    assert lo < 0.6 < hi and 0.2 <= lo and hi <= 1.0
    assert (lo, hi) == bootstrap_ci(vals, n_boot=2000, seed=0)  # seeded
    assert bootstrap_ci([], n_boot=10) == (None, None) and bootstrap_ci([None, 0.7]) == (0.7, 0.7)
    with pytest.raises(ConfigError):
        bootstrap_ci([1.0], n_boot=0)


# ---------------------------------------------------------------------------------------------
# Parsing and log-probs
# ---------------------------------------------------------------------------------------------
def test_parsers_accept_the_formats_and_refuse_malformed_answers():
    assert parse_labels("[1, 0, 0, 1, 1]", 5) == [1, 0, 0, 1, 1]
    assert parse_labels("Sure! Labels: [1,0]", 2) == [1, 0]
    assert parse_labels("1 0 1", 3) == [1, 0, 1]
    for bad in ("[1, 0, 2]", "[1, 0]", "I cannot tell.", "", None, "[1, 0, 0.5]"):
        assert parse_labels(bad, 3) is None
    assert parse_choice("3", 5) == 3 and parse_choice("Excerpt 2 is the intruder.", 5) == 2
    assert parse_choice("Answer: 4", 5) == 4
    for bad in ("7", "0", "none of them", None, "2.5"):
        assert parse_choice(bad, 5) is None
    assert parse_activations("Activations: 0, 0, 7, 10", 4) == [0, 0, 7, 10]
    assert parse_activations("0,3", 2) == [0, 3]
    for bad in ("Activations: 0, 11", "Activations: 0", "Activations: 0, -1", "no idea"):
        assert parse_activations(bad, 2) is None
    t = Tally()
    assert t.read(Answer("[1, 0]"), parse_labels, 2) == [1, 0]
    assert t.read(Answer("what?"), parse_labels, 2) is None
    assert t.read(Answer.failed("HTTP 500"), parse_labels, 2) is None
    assert t.as_dict() == {"calls": 3, "failed_calls": 1, "malformed": 1}


def test_choice_probability_from_first_token_logprobs():
    a = Answer("1", logprobs=[lp(("1", 0.6), ("0", 0.3), (" the", 0.1))])
    assert choice_probability(a, ["0", "1"]) == pytest.approx({"0": 1 / 3, "1": 2 / 3})
    assert choice_probability(Answer("1"), ["0", "1"]) is None  # no log-probs
    b = Answer("Answer: 3", logprobs=[lp(("Answer", 1.0)), lp((":", 1.0)), lp((" 3", 0.5), (" 2", 0.25), (" 1", 0.25))])
    assert answer_tokens(b) == ["Answer", ":", " 3"]
    assert choice_probability(b, ["1", "2", "3"]) == pytest.approx({"1": 0.25, "2": 0.25, "3": 0.5})
    assert choice_probability(b, ["1", "2", "3"], position=0) is None  # no choice among the alternatives there
    c = Answer("[1, 0]", logprobs=[lp(("[", 1)), lp(("1", .8), ("0", .2)), lp((",", 1)), lp((" 0", .7), (" 1", .3)),
                                   lp(("]", 1))])
    assert choice_distributions(c, ["0", "1"]) == [pytest.approx({"0": .2, "1": .8}), pytest.approx({"0": .7, "1": .3})]
    assert aligned_distributions(c, ["0", "1"], [1, 0]) is not None
    assert aligned_distributions(c, ["0", "1"], [0, 0]) is None  # the tokens are not what the text says
    # "10" written as two tokens: the number tokens do not line up with the values
    d = Answer("10", logprobs=[lp(("1", .9), ("2", .1)), lp(("0", 1))])
    assert aligned_distributions(d, [str(v) for v in range(11)], [10]) is None
    assert expected_value({"0": 0.5, "10": 0.5}) == 5.0 and expected_value(None) is None
    # a sampled token outside the top-k: tokens cannot be recovered
    assert answer_tokens(Answer("1", logprobs=[lp(("0", 1.0))])) is None


# ---------------------------------------------------------------------------------------------
# Descriptions
# ---------------------------------------------------------------------------------------------
def test_check_description():
    assert check_description("  fires on cats. ") == "fires on cats."
    for bad, words in (("", "empty"), ("   \n", "empty"), ("x" * 100_000, "100,000 characters"), (None, "string")):
        with pytest.raises(DescriptionError, match=words) as info:
            check_description(bad)
        assert isinstance(info.value, FeatureAtlasError) and isinstance(info.value, ValueError)
    check_description("x" * 2000)


# ---------------------------------------------------------------------------------------------
# The LLM judge over HTTP
# ---------------------------------------------------------------------------------------------
def test_llm_judge_asks_with_logprobs_and_seeds_are_cache_entries(judge_server, key_env, tmp_path):
    srv = judge_server(lambda user, i: "1" if "cat" in user else "0", alts={"1": [("1", .9), ("0", .1)],
                                                                           "0": [("0", .8), ("1", .2)]})
    judge = llm_judge(srv, cache=ResponseCache(tmp_path / "c"))
    assert judge.name == "openai:fake-model" and judge.kind == "llm"
    a, b = judge.ask(["Is there a cat?", "Is there a dog?"], max_tokens=2, logprobs=True, seed=0)
    assert (a.text, b.text) == ("1", "0")
    assert choice_probability(a, ["0", "1"])["1"] == pytest.approx(0.9)
    assert choice_probability(b, ["0", "1"])["1"] == pytest.approx(0.2)
    assert srv.bodies[0]["logprobs"] is True and srv.bodies[0]["max_tokens"] == 2
    judge.ask(["Is there a cat?"], max_tokens=2, logprobs=True, seed=0)
    assert srv.chat_requests == 2  # cached
    judge.ask(["Is there a cat?"], max_tokens=2, logprobs=True, seed=1)
    assert srv.chat_requests == 3  # another seed is another cache entry
    assert judge.ask([], max_tokens=2) == []


def test_llm_judge_refuses_the_template_explainer_and_bad_seeds(judge_server, key_env):
    with pytest.raises(ConfigError, match="template explainer .* cannot judge"):
        LLMJudge(TemplateExplainer())
    with pytest.raises(ConfigError, match="Explainer client"):
        LLMJudge(object())
    srv = judge_server(lambda user, i: "1")
    with pytest.raises(ConfigError, match="seed"):
        llm_judge(srv).ask(["x"], max_tokens=1, seed=-1)
    assert srv.chat_requests == 0


def test_json_of_a_reply_with_logprobs_is_what_openai_sends(judge_server, key_env):
    srv = judge_server(lambda user, i: "[1, 0]", alts={"1": [("1", .6), ("0", .4)]})
    body = srv.reply("[1, 0]")
    json.dumps(body)
    pos = body["choices"][0]["logprobs"]["content"]
    assert [p["token"] for p in pos] == ["[", "1", ",", " 0", "]"]
    assert pos[1]["top_logprobs"][1] == {"token": "0", "logprob": pytest.approx(math.log(.4))}
