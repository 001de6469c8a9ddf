"""The output-centric paper's input evaluation: sentence parsing, the LLM variant against a loopback
OpenAI-compatible server (tests/test_explainers.py's FakeLLM) on token-detector features of the real
SmolLM2 at resid_pre.0 (the token embedding, so which sentences activate a feature is known exactly), and
the offline variant with the embedding judge on a synthetic store."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_explainers import FakeLLM

from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.models.tokenizer import ByteTokenizer
from featureatlas.activation_store.store import write_store
from featureatlas.eval.adapters import NeuronDictionary
from featureatlas.eval.embedder import EmbeddingJudge
from featureatlas.eval.explainers import OpenAIExplainer
from featureatlas.eval.input_eval import (InputEvalConfig, embedding_input_evaluation, input_evaluation,
                                          offline_input_evaluation, parse_sentences, sentence_max_activations,
                                          success_rate)
from featureatlas.eval.judges import DescriptionError, LLMJudge
from featureatlas.eval.schema import validate_score

PARIS = ["I love Paris in spring.", "We flew to Paris last week.", "The museum in Paris was crowded.",
         "She studied art in Paris.", "The capital of France is Paris."]
NEUTRAL = ["The cat sat on the mat.", "My cat likes fish.", "A cat chased the ball.", "The cat is asleep.",
           "He fed the cat early."]


# ---- parsing -------------------------------------------------------------------------------------

def test_parse_sentences_json_fenced_and_lists():
    js = json.dumps({"activating": PARIS, "neutral": NEUTRAL})
    assert parse_sentences(js) == (PARIS, NEUTRAL)
    assert parse_sentences(f"Sure! Here you go:\n```json\n{js}\n```\nHope it helps.") == (PARIS, NEUTRAL)
    listed = ("Activating sentences:\n" + "\n".join(f"{i + 1}. \"{s}\"" for i, s in enumerate(PARIS))
              + "\n\n**Neutral:**\n" + "\n".join(f"- {s}" for s in NEUTRAL))
    assert parse_sentences(listed) == (PARIS, NEUTRAL)
    more = json.dumps({"Activating": PARIS + ["extra"], "neutral_sentences": NEUTRAL})
    assert parse_sentences(more) == (PARIS, NEUTRAL)
    assert parse_sentences(json.dumps({"activating": PARIS[:4], "neutral": NEUTRAL})) is None
    assert parse_sentences(json.dumps({"activating": PARIS, "neutral": ["", " ", 3, None, "x"]})) is None
    assert parse_sentences("I cannot help with that.") is None
    assert parse_sentences(None) is None and parse_sentences("   ") is None


# ---- the LLM variant ----------------------------------------------------------------------------

@dataclasses.dataclass
class TokenDetectors:
    """Feature i = relu(<x, e_i> / ||e_i||^2) at resid_pre.0 for the embedding e_i of token ids[i]: exactly 1 on
    that token, well below 1 on the tokens of ordinary sentences."""

    E_FxD: np.ndarray
    hook: str = "resid_pre.0"

    @property
    def n_features(self):
        return self.E_FxD.shape[0]

    @property
    def directions_FxD(self):
        return jnp.asarray(self.E_FxD)

    def encode(self, x):
        U = self.E_FxD / (self.E_FxD ** 2).sum(1, keepdims=True)
        return jnp.maximum(jnp.asarray(x, jnp.float32) @ jnp.asarray(U).T, 0.0)

    def decode(self, c):
        return jnp.asarray(c) @ self.directions_FxD

    def residual_directions(self, model):
        return self.directions_FxD


@pytest.fixture(scope="module")
def detectors(smollm2):
    E = np.asarray(smollm2.params["embed"], np.float32)
    ids = [smollm2.tokenizer.encode(" Paris")[0], smollm2.tokenizer.encode(" cat")[0]]
    return TokenDetectors(np.stack([E[ids[0]], E[ids[1]], E[ids[0]]]))  # 0: Paris, 1: cat, 2: Paris


class SentenceLLM(FakeLLM):
    """Answers with Paris sentences as activating and cat sentences as neutral, whatever the description;
    descriptions that mention 'gibberish' get an unreadable answer."""

    def answer_for(self, user):
        if "gibberish" in user:
            return "Activating: blah blah"
        return "```json\n" + json.dumps({"activating": PARIS, "neutral": NEUTRAL}) + "\n```"


@pytest.fixture
def judge():
    server = SentenceLLM()
    yield LLMJudge(OpenAIExplainer(server.url, "fake-judge", api_key_env=None, timeout=10.0)), server
    server.close()


def test_sentence_activations_are_exact_at_the_embedding(smollm2, detectors):
    acts = sentence_max_activations(smollm2, detectors, PARIS[:2] + NEUTRAL[:2], [0, 0, 1, 0], batch=3)
    np.testing.assert_allclose(acts[[0, 1, 2]], 1.0, atol=1e-5)  # the token itself
    assert acts[3] < 0.5  # no " Paris" in a cat sentence
    # BOS is excluded: an empty sentence has no token to fire on
    assert sentence_max_activations(smollm2, detectors, [""], [0])[0] == 0.0


def test_llm_input_evaluation(smollm2, detectors, judge):
    llm, server = judge
    desc = {0: "mentions of the city of Paris", 1: "mentions of the city of Paris", 2: "gibberish"}
    scores = input_evaluation(smollm2, detectors, desc, llm, InputEvalConfig(batch=8), seed=0)
    assert server.chat_requests == 3
    for s in scores.values():
        validate_score(s, "feature", "score")
        assert s["judge"] == "openai:fake-judge" and s["method"] == "input"
    s0, s1, s2 = scores[0], scores[1], scores[2]
    assert s0["value"] == 1.0 and s0["metrics"]["success"] and s0["metrics"]["mean_activating"] == pytest.approx(1.0,
                                                                                                                abs=1e-5)
    assert s1["value"] == 0.0 and s1["metrics"]["mean_neutral"] == pytest.approx(1.0, abs=1e-5)  # the cat detector
    assert s2["value"] is None and s2["failed"] == 1 and s2["metrics"]["error"] == "malformed answer"
    rate = success_rate(scores)
    assert rate["percent"] == 50.0 and rate["n"] == 2 and rate["failed"] == 1
    lo, hi = rate["ci"]
    assert 0.0 <= lo <= 50.0 <= hi <= 100.0


def test_bad_descriptions_fail_before_any_call(smollm2, detectors, judge):
    llm, server = judge
    for bad in ("", "   ", "x" * 100_000):
        with pytest.raises(DescriptionError):
            input_evaluation(smollm2, detectors, {0: "Paris", 1: bad}, llm)
    assert server.chat_requests == 0


def test_failed_judge_calls_are_counted_not_scored(smollm2, detectors):
    server = FakeLLM(script=[("status", 400, {})])
    try:
        llm = LLMJudge(OpenAIExplainer(server.url, "fake-judge", api_key_env=None, timeout=5.0, max_retries=0))
        scores = input_evaluation(smollm2, detectors, {0: "Paris"}, llm)
    finally:
        server.close()
    assert scores[0]["value"] is None and scores[0]["failed"] == 1
    assert scores[0]["metrics"]["error"].startswith("judge call failed")
    assert success_rate(scores) == {"percent": None, "ci": [None, None], "n": 0, "failed": 1}


# ---- the offline variant ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool_store(tmp_path_factory):
    tok = ByteTokenizer()
    words = ["apple", "river", "stone", "cloud", "music", "table", "green", "quick"]
    rng = np.random.default_rng(0)
    texts = []
    for c in range(60):
        w = list(rng.choice(words, size=4))
        if c % 4 == 0:
            w[int(rng.integers(0, 4))] = "paris"
        texts.append(" ".join(w))
    T, D = 40, 4
    tokens = np.zeros((60, T), np.int32)
    n_valid = np.zeros(60, np.int32)
    acts = rng.normal(size=(60, T, D)).astype(np.float32) * 0.1
    for c, t in enumerate(texts):
        ids = [tok.bos_id] + tok.encode(t)
        tokens[c, :len(ids)], n_valid[c] = ids, len(ids)
        if "paris" in t:
            acts[c, 1 + t.index("paris"), 0] = 5.0  # feature 0 fires on the "p" of paris
    acts[:, :, 1] = -1.0  # feature 1 never fires
    acts[:, 0, :] = 50.0  # BOS, ignored
    store = write_store(tmp_path_factory.mktemp("pool") / "s.h5", acts={"resid_post.0": acts.reshape(-1, D)},
                        tokens=tokens, n_valid=n_valid)
    real = (np.arange(T)[None] >= 1) & (np.arange(T)[None] < n_valid[:, None])
    max_acts = np.where(real, np.maximum(acts[:, :, 0], 0), 0).max(1)  # feature 0's max per context
    return store, tok, texts, max_acts


def test_offline_input_evaluation(pool_store):
    store, tok, texts, a0 = pool_store
    dic = NeuronDictionary("resid_post.0", 4)
    judge = EmbeddingJudge()  # the real all-MiniLM-L6-v2
    pool = np.arange(60)
    scores = offline_input_evaluation(store, dic, tok, {0: "paris", 1: "paris"}, judge, pool,
                                      InputEvalConfig(m=10, contexts_per_chunk=16), seed=3)
    for s in scores.values():
        validate_score(s, "feature", "score")
        assert s["judge"] == "embedding:all-MiniLM-L6-v2" and s["n"] == 20
    s0, s1 = scores[0], scores[1]
    assert all("paris" in texts[i] for i in s0["metrics"]["similar"])  # 15 contexts mention it
    y = [1] * 10 + [0] * 10
    want = roc_auc_score(y, np.concatenate([a0[s0["metrics"]["similar"]], a0[s0["metrics"]["random"]]]))
    assert s0["value"] == pytest.approx(want) and s0["value"] > 0.7 and s0["metrics"]["success"]
    assert s1["value"] == 0.5 and s1["metrics"]["success"] is False
    assert s0["metrics"]["random"] != embedding_input_evaluation(
        judge, {0: "paris"}, texts, a0[:, None], m=10, seed=4)[0]["metrics"]["random"]
    # block by block (the pool is encoded once and memoised) equals one call
    one = offline_input_evaluation(store, dic, tok, {1: "paris"}, judge, pool, InputEvalConfig(m=10), seed=3)
    assert one[1] == {**s1, "seconds": one[1]["seconds"]}
    with pytest.raises(ConfigError, match="pool of at least"):
        offline_input_evaluation(store, dic, tok, {0: "paris"}, judge, pool[:15], InputEvalConfig(m=10))
