"""Output evaluation (Gur-Arieh et al. 2025) and steering evaluation (Shafran et al. 2025): judge logic on fixed
generation texts (the real embedding judge; an LLM judge through a loopback OpenAI-compatible server whose
answers follow a rule), the scoring rules, and on the real SmolLM2-135M: planted features that write a known
token score far above chance, random directions near chance; the steering generation step end to end."""
from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from featureatlas.activation_store.errors import ConfigError
from featureatlas.eval.explainers import Answer, OpenAIExplainer
from featureatlas.eval.judges import DescriptionError, LLMJudge
from featureatlas.eval.output_eval import (
    OutputEvalConfig, OutputEvalError, SteeringEvalConfig, answer_choice, concept_level, fluency_level,
    harmonic_score, output_evaluation, output_generations, output_summary, output_trials, steering_evaluation,
    steering_generations, steering_summary,
)
from test_explainers import KEY, KEY_ENV, FakeLLM

CONCEPTS = {
    0: ("football matches and players", [" the striker scored a goal in the football match", " football fans cheered "
        "the team in the stadium", " the goalkeeper saved a penalty kick"]),
    1: ("cooking food in the kitchen", [" she baked bread and cooked pasta for dinner", " chop the onions and fry "
        "them in butter", " the recipe needs flour, sugar and eggs"]),
    2: ("rain, storms and the weather", [" heavy rain and thunderstorms are forecast", " the weather turned cold "
        "and windy", " a storm brought snow and strong winds"]),
    3: ("computers and software", [" the program crashed when the computer restarted", " install the software "
        "update on your laptop", " the code compiles on the new processor"]),
}


def fixed_generations(targets=(0.5, -0.5)) -> dict:
    """{feature: {target: texts}}: every target of feature f shows f's concept."""
    return {f: {t: list(texts) for t in targets} for f, (_, texts) in CONCEPTS.items()}


@pytest.fixture(scope="module")
def embedding_judge():
    from featureatlas.eval.embedder import EmbeddingJudge

    return EmbeddingJudge()


# ---------------------------------------------------------------------------------------------
# Scoring rules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c,f,want", [(2, 2, 2.0), (1, 1, 1.0), (2, 1, 4 / 3), (1, 2, 4 / 3), (0, 2, 0.0), (2, 0, 0.0),
                                      (0, 0, 0.0)])
def test_harmonic_score(c, f, want):
    assert harmonic_score(c, f) == pytest.approx(want)


def test_offline_levels_follow_the_unsteered_distribution():
    base = np.linspace(0.0, 1.0, 101)  # median 0.5, 95th percentile 0.95
    assert concept_level(0.97, base) == 2
    assert concept_level(0.7, base) == 1
    assert concept_level(0.5, base) == 0  # strictly above the median for 1
    ppl = np.linspace(10, 30, 101)  # 95th percentile 29
    assert fluency_level(12.0, ppl) == 2
    assert fluency_level(29.0, ppl) == 2
    assert fluency_level(50.0, ppl) == 1
    assert fluency_level(58.1, ppl) == 0
    assert fluency_level(float("nan"), ppl) == 0


def test_answer_choice_from_logprobs_text_or_malformed():
    opts = ["1", "2", "3"]
    lp = Answer(text="2", logprobs=[[["2", math.log(0.7)], ["3", math.log(0.2)], ["x", math.log(0.1)]]])
    choice, probs = answer_choice(lp, opts)
    assert choice == "2" and probs["2"] == pytest.approx(0.7 / 0.9) and probs["1"] == 0.0
    assert answer_choice(Answer(text="Set 3."), opts) == ("3", None)
    assert answer_choice(Answer(text="I cannot decide"), opts) == (None, None)
    assert answer_choice(Answer(text="7"), opts) == (None, None)
    assert answer_choice(Answer.failed("HTTP 500"), opts) == (None, None)
    assert answer_choice(Answer(text="2"), ["0", "1", "2"]) == ("2", None)
    assert answer_choice(Answer(text="5"), ["0", "1", "2"]) == (None, None)


# ---------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------
def test_trials_are_seeded_per_feature_and_use_same_target_distractors():
    gens = fixed_generations()
    gens[3][-0.5] = []  # feature 3 did not reach -0.5
    trials, skipped = output_trials(gens, [0, 1, 2, 3], seed=7)
    alone, _ = output_trials(gens, [1], seed=7)
    assert [t for t in trials if t.feature == 1] == alone  # independent of the other evaluated features
    for t in trials:
        assert len(set(t.shown)) == 3 and t.shown[t.answer] == t.feature
        assert all(gens[f][t.group] for f in t.shown)  # distractors reached the same target
    assert not any(t.feature == 3 and t.group == -0.5 for t in trials)
    # at -0.5 only 0, 1, 2 have texts: each has exactly two distractors; with one fewer, none
    gens[2][-0.5] = []
    _, skipped = output_trials(gens, [0, 1, 2, 3], seed=7)
    assert skipped == {0: {"-0.5": "no_distractors"}, 1: {"-0.5": "no_distractors"}}
    positions = {t.answer for s in range(6) for t in output_trials(gens, [0, 1, 2, 3], seed=s)[0]}
    assert positions == {0, 1, 2}  # the feature's set is shown in every position
    by_sign, _ = output_trials(fixed_generations(), [0], group="sign")
    assert sorted(t.group for t in by_sign) == ["+", "-"]
    pooled, _ = output_trials(fixed_generations(), [0, 1], pool=[1, 2, 3], seed=3)
    assert all(set(t.shown) - {t.feature} <= {1, 2, 3} for t in pooled)
    with pytest.raises(OutputEvalError, match=r"pool names features \[7\]"):
        output_trials(fixed_generations(), [0], pool=[1, 2, 7])


# ---------------------------------------------------------------------------------------------
# The embedding judge on fixed texts
# ---------------------------------------------------------------------------------------------
def test_embedding_judge_picks_the_set_of_the_described_concept(embedding_judge):
    desc = {f: d for f, (d, _) in CONCEPTS.items()}
    gens = json.loads(json.dumps(fixed_generations()))  # string keys, as read back from a cache
    for seed in range(3):
        scores = output_evaluation(None, None, None, desc, embedding_judge, generations=gens, seed=seed)
        for f, s in scores.items():
            assert s["value"] == 1.0 and s["n"] == 2 and s["failed"] == 0, (f, s)
            assert s["judge"] == "embedding:all-MiniLM-L6-v2" and s["method"] == "output"
            assert all(tr["margin"] > 0 for tr in s["metrics"]["trials"].values())
    wrong = {f: desc[(f + 1) % 4] for f in desc}  # shuffled descriptions: the judge follows the description
    scores = output_evaluation(None, None, None, wrong, embedding_judge, generations=gens)
    for f, s in scores.items():
        for tr in s["metrics"]["trials"].values():
            if (f + 1) % 4 in tr["shown"]:
                assert not tr["correct"] and tr["shown"][tr["picked"]] == (f + 1) % 4
    assert output_summary(scores)["rate"] < 0.5


def test_unreached_targets_are_reported_not_scored(embedding_judge):
    desc = {f: d for f, (d, _) in CONCEPTS.items()}
    gens = fixed_generations()
    gens[0][-0.5] = []
    gens[3] = {0.5: [], -0.5: []}
    cfg = OutputEvalConfig(targets=(0.5, -0.5))
    scores = output_evaluation(None, None, None, desc, embedding_judge, cfg, generations=gens)
    assert scores[0]["n"] == 1 and scores[0]["value"] == 1.0 and scores[0]["metrics"]["unreached"] == [-0.5]
    assert scores[3]["value"] is None and scores[3]["n"] == 0 and scores[3]["metrics"]["unreached"] == [0.5, -0.5]
    summ = output_summary(scores)
    assert summ["rate"] == 1.0 and summ["n_scored"] == 3 and summ["unscored"] == [3]
    assert summ["unreached"] == {"count": 2, "features": {0: [-0.5], 3: [0.5, -0.5]}}
    assert summ["chance"] == pytest.approx(1 / 3) and summ["ci"] == [1.0, 1.0]


def test_bad_descriptions_and_missing_generations_fail_before_judging(embedding_judge):
    gens = fixed_generations()
    with pytest.raises(DescriptionError, match="feature 0: the description is empty"):
        output_evaluation(None, None, None, {0: "  ", 1: "cooking"}, embedding_judge, generations=gens)
    with pytest.raises(DescriptionError, match="feature 1: .*100,000 characters"):
        output_evaluation(None, None, None, {0: "football", 1: "x" * 100_000}, embedding_judge, generations=gens)
    with pytest.raises(OutputEvalError, match=r"lack features \[9\]"):
        output_evaluation(None, None, None, {9: "football"}, embedding_judge, generations=gens)
    with pytest.raises(OutputEvalError, match="needs the model"):
        output_evaluation(None, None, None, {0: "football"}, embedding_judge)
    with pytest.raises(ConfigError, match="LLMJudge .* or an EmbeddingJudge"):
        output_evaluation(None, None, None, {0: "football"}, object(), generations=gens)
    with pytest.raises(ConfigError, match="--targets"):
        output_evaluation(None, None, None, {0: "football"}, embedding_judge, OutputEvalConfig(targets=(0.5, 0.0)),
                          generations=gens)
    with pytest.raises(ConfigError, match="--signs"):
        steering_evaluation(None, None, None, {0: "football"}, embedding_judge, SteeringEvalConfig(signs=(2,)),
                            generations=_steering_gens())


# ---------------------------------------------------------------------------------------------
# The LLM judge through a loopback OpenAI-compatible server
# ---------------------------------------------------------------------------------------------
class RuleLLM(FakeLLM):
    """FakeLLM answering every chat request by rule(user_text)."""

    def __init__(self, rule):
        self.rule = rule
        super().__init__(("ok",))

    def answer_for(self, user: str) -> str:
        return self.rule(user)


@pytest.fixture
def llm_judge(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    made = []

    def make(rule):
        made.append(RuleLLM(rule))
        return LLMJudge(OpenAIExplainer(made[-1].url, "fake-model", api_key_env=KEY_ENV, timeout=5.0, backoff=0.01,
                                        max_retries=0))

    yield make
    for s in made:
        s.close()


def _set_with(user: str, word: str) -> str | None:
    """The number of the set (in the judge prompt) whose texts contain `word`."""
    sets = user.split("Set ")[1:]
    hits = [s.split(":")[0] for s in sets if word in s.split(":", 1)[1]]
    return hits[0] if len(hits) == 1 else None


def test_llm_judge_output_choices_and_malformed_answers(llm_judge):
    def rule(user):
        desc = user.split('Feature description: "')[1].split('"')[0]
        if "weather" in desc:
            return "I am not sure."  # malformed: counted as failed, excluded
        return _set_with(user, {"football": "goal", "cooking": "onions", "computers": "software"}[desc.split()[0]])

    judge = llm_judge(rule)
    desc = {0: "football", 1: "cooking", 2: "weather", 3: "computers"}
    scores = output_evaluation(None, None, None, desc, judge, generations=fixed_generations(), seed=0)
    for f in (0, 1, 3):
        assert scores[f]["value"] == 1.0 and scores[f]["n"] == 2 and scores[f]["failed"] == 0
        assert scores[f]["tokens_in"] > 0 and scores[f]["judge"] == "openai:fake-model"
    assert scores[2]["value"] is None and scores[2]["n"] == 0 and scores[2]["failed"] == 2
    assert scores[2]["metrics"]["malformed"] == 2
    assert all("malformed" in t["error"] for t in scores[2]["metrics"]["trials"].values())
    summ = output_summary(scores)
    assert summ["rate"] == 1.0 and summ["failed"] == 2 and summ["unscored"] == [2]


def _steering_gens() -> dict:
    rec = lambda texts, reached=True, ppl=None: {  # noqa: E731
        "alpha": 10.0, "kl": 0.1, "reached": reached, "status": "reached" if reached else "too_weak",
        "texts": texts, "ppl": ppl or [20.0] * len(texts), "nll_increase": 0.05 if reached else None}
    return {"prompt": "I think that", "seconds": 1.0,
            "baseline": {"texts": [" it is fine.", " we should go home now.", " the day was long.", " you are right.",
                                   " this is a good idea.", " nothing happened today."],
                         "ppl": [15.0, 18.0, 20.0, 22.0, 25.0, 30.0]},
            "features": {
                0: {0.1: rec([" the football match ended with a goal", " football football football"]),
                    0.5: rec([" garbled", " football players trained"], ppl=[900.0, 24.0]),
                    -0.1: rec([" it is a nice day"]),
                    -0.5: rec([], reached=False)},
            }}


def test_llm_judge_steering_concept_fluency_and_harmonic_mean(llm_judge):
    def rule(user):
        text = user.split('"')[-2]
        if "How fluent" in user:
            return "seven" if "garbled" in text else "1"
        return "2" if "football" in text else "0"

    judge = llm_judge(rule)
    s = steering_evaluation(None, None, None, {0: "football"}, judge, generations=_steering_gens())[0]
    st = s["metrics"]["strengths"]
    assert st["+0.1"]["concept"] == 2 and st["+0.1"]["fluency"] == 1 and st["+0.1"]["score"] == pytest.approx(4 / 3)
    assert st["+0.5"]["n"] == 1 and st["+0.5"]["failed"] == 1  # the malformed fluency answer fails that text
    assert st["-0.1"]["score"] == 0.0  # concept 0 -> score 0 whatever the fluency
    assert st["-0.5"]["reached"] is False and "score" not in st["-0.5"]
    assert s["value"] == pytest.approx(4 / 3) and s["metrics"]["best"] in ("+0.1", "+0.5")
    assert s["n"] == 4 and s["failed"] == 1 and s["metrics"]["malformed"] == 1
    assert s["metrics"]["unreached"] == [-0.5] and st["+0.1"]["nll_increase"] == 0.05
    summ = steering_summary({0: s})
    assert summ["score"] == pytest.approx(4 / 3) and summ["unreached"]["count"] == 1


def test_offline_steering_judge_on_fixed_texts(embedding_judge):
    gens = json.loads(json.dumps(_steering_gens()))
    s = steering_evaluation(None, None, None, {0: "football"}, embedding_judge, generations=gens)[0]
    st = s["metrics"]["strengths"]
    assert st["+0.1"]["concept"] == 2 and st["+0.1"]["fluency"] == 2 and st["+0.1"]["score"] == 2.0
    assert st["+0.5"]["fluency"] == 1.0  # ppl 900 -> 0, 24 -> 2
    assert st["-0.1"]["concept"] < 2
    assert s["value"] == 2.0 and s["metrics"]["best"] == "+0.1" and s["failed"] == 0


# ---------------------------------------------------------------------------------------------
# The real model: planted features vs random directions; the steering generation step
# ---------------------------------------------------------------------------------------------
WORDS = [" Paris", " football", " music", " water", " computer", " dog"]
NAMES = ["Paris", "football", "music", "water", "computers", "dogs"]


@pytest.mark.slow
def test_planted_features_far_above_chance_random_near_chance(smollm2, embedding_judge):
    m = smollm2
    W_U = np.asarray(m.W_U)
    ids = [m.tokenizer.encode(w)[0] for w in WORDS]
    rng = np.random.default_rng(0)
    V = np.concatenate([W_U[:, ids].T, rng.standard_normal((len(ids), W_U.shape[0]))]).astype(np.float32)
    hook = f"resid_post.{m.config.n_layers - 4}"
    cfg = OutputEvalConfig(prompts=("I think",), n_new=10, targets=(0.5,), n_samples=3, iters=12)
    gens = output_generations(m, V, hook, list(range(len(V))), cfg)
    assert all(gens.calibration[f][0.5]["reached"] for f in gens)
    n = len(ids)
    hits, rand = [], []
    for seed in range(3):
        sc = output_evaluation(None, None, None, {f: f"mentions of {NAMES[f]}" for f in range(n)}, embedding_judge,
                               cfg, generations=gens, seed=seed, pool=range(n))
        hits += [s["value"] for s in sc.values()]
        for rot in range(n):  # every concept description on every random direction, among random directions
            sc = output_evaluation(None, None, None, {n + f: f"mentions of {NAMES[(f + rot) % n]}" for f in range(n)},
                                   embedding_judge, cfg, generations=gens, seed=seed, pool=range(n, 2 * n))
            rand += [s["value"] for s in sc.values()]
    assert np.mean(hits) >= 0.9, hits
    assert 0.15 <= np.mean(rand) <= 0.55, np.mean(rand)  # chance is 1/3


class TinySAE:
    """A ReLU SAE-shaped dictionary (the protocol's attributes only) for the latent-clamp path."""

    def __init__(self, hook, W_dec_FxD):
        self.hook, self.directions_FxD = hook, W_dec_FxD
        self.n_features = W_dec_FxD.shape[0]

    def encode(self, x_NxD):
        return jax.nn.relu(x_NxD @ self.directions_FxD.T)

    def decode(self, codes_NxF):
        return codes_NxF @ self.directions_FxD


def test_steering_generation_step_end_to_end_on_a_tiny_model(embedding_judge):
    from featureatlas.activation_store.models import random_model

    m = random_model("llama", n_layers=2, d_model=32, d_mlp=64, n_heads=4, n_kv_heads=2, max_ctx=128, seed=0)
    hook = "resid_post.0"
    V = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    # the tiny model reaches KL 0.1 at |alpha| ~ 1.5: search from 0.01
    cfg = SteeringEvalConfig(targets=(0.1, 0.5), n_samples=3, n_new=6, n_baseline=6, iters=14, lo=0.01)
    corpus = np.random.default_rng(1).integers(3, 250, (2, 12))
    # the SAE path (latent clamp keeping the error); the add path of arrays runs in the planted-feature test
    gens = steering_generations(m, TinySAE(hook, V), None, [0, 2], cfg, corpus_tokens=corpus, clamp_latent=True)
    assert sorted(gens["features"]) == [0, 2] and sorted(gens["features"][0]) == [-0.5, -0.1, 0.1, 0.5]
    assert len(gens["baseline"]["texts"]) == 6 and all(p is None or p > 1 for p in gens["baseline"]["ppl"])
    n_reached = 0
    for f, per in gens["features"].items():
        for t, cell in per.items():
            assert (cell["alpha"] > 0) == (t > 0)
            if cell["reached"]:
                n_reached += 1
                assert abs(t) <= cell["kl"] <= abs(t) + cfg.band + 1e-6
                assert len(cell["texts"]) == len(cell["ppl"]) == 3 and math.isfinite(cell["nll_increase"])
            else:
                assert cell["texts"] == [] and cell["status"] != "reached" and cell["nll_increase"] is None
    assert n_reached >= 6
    gens = json.loads(json.dumps(gens))
    scores = steering_evaluation(None, None, None, {0: "bytes", 2: "more bytes"}, embedding_judge, cfg,
                                 generations=gens)
    for s in scores.values():
        assert s["method"] == "steering" and set(s["metrics"]["strengths"]) == {"+0.1", "+0.5", "-0.1", "-0.5"}
        assert s["value"] is None or 0 <= s["value"] <= 2
    summ = steering_summary(scores)
    assert summ["n_features"] == 2 and set(summ["by_strength"]) == {"+0.1", "+0.5", "-0.1", "-0.5"}
