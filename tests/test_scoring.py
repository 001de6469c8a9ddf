"""Input-side scorers on synthetic held-out windows, with a rule-following judge on a loopback OpenAI-compatible
server (test_judges.JudgeLLM), and the scoring sets of a real tiny cache (held-out only, hard negatives silent)."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.store import write_store
from featureatlas.eval.cache import EXPLAIN, CacheConfig, FeatureCache, build_cache, held_out_mask
from featureatlas.eval.embedder import EmbeddingJudge
from featureatlas.eval.judges import DescriptionError
from featureatlas.eval.schema import validate_score
from featureatlas.eval.scoring import (
    ScoringConfig, ScoringSet, build_scoring_sets, detection, embedding_score, fuzz_marks, fuzzing, intruder,
    scoring_sets, simulation, simulation_windows, window_text,
)
from test_judges import judge_server, key_env, llm_judge  # noqa: F401 (fixtures)

# ---------------------------------------------------------------------------------------------
# Synthetic features: each fires on the words of one topic
# ---------------------------------------------------------------------------------------------
TOPICS = {
    0: ["cat", "kitten", "purr", "whiskers"],
    1: ["rain", "storm", "umbrella", "thunder"],
    2: ["piano", "melody", "chord", "violin"],
    3: ["soccer", "goal", "referee", "stadium"],
}
FILLER = ["the", "a", "was", "on", "then", "we", "it", "and", "so", "very", "table", "road", "paper", "window",
          "market", "glass", "chair", "door"]
STOP = {"words", "about", "or", "mentions", "of"}


def describe(f: int) -> str:
    return "mentions of " + ", ".join(TOPICS[f][:-1]) + " or " + TOPICS[f][-1]


def window(ctx: int, words: list[str], fire: set[str], act: float = 5.0) -> dict:
    toks = [" " + w for w in words]
    acts = [act if w in fire else 0.0 for w in words]
    return {"context": ctx, "start": 0, "tokens": toks, "acts": acts, "max_pos": int(np.argmax(acts))}


def synthetic_windows(n_top=4, n_bins=2, per_bin=4, n_random=4, seed=0):
    """example_windows-shaped held-out windows of the 4 topic features (contexts unique across everything)."""
    rng = np.random.default_rng(seed)
    ctx = iter(range(1000, 100000))
    out = {}
    for f, vocab in TOPICS.items():
        def pos(act):
            words = list(rng.choice(FILLER, 6))
            for w in rng.choice(vocab, 2, replace=False):
                words.insert(int(rng.integers(len(words) + 1)), str(w))
            return window(next(ctx), words, set(vocab), act)
        out[f] = {"top": [pos(9.0 - i * 0.1) for i in range(n_top)],
                  "quantiles": [[pos(1.0 + q + 0.01 * i) for i in range(per_bin)] for q in range(n_bins)],
                  "random": [window(next(ctx), list(rng.choice(FILLER, 8)), set()) for _ in range(n_random)]}
    return out


def window_fires(w: dict, f: int) -> bool:
    return any(t.strip() in TOPICS[f] for t in w["tokens"])


@pytest.fixture(scope="module")
def minilm():
    """The real offline embedding judge (all-MiniLM-L6-v2 in JAX), shared by the module (it memoises vectors)."""
    return EmbeddingJudge()


@pytest.fixture(scope="module")
def sets(minilm):
    windows = synthetic_windows()
    pool = [w for f in windows for w in windows[f]["top"] + [x for b in windows[f]["quantiles"] for x in b]]
    pool_max = {f: np.asarray([5.0 if window_fires(w, f) else 0.0 for w in pool]) for f in windows}
    cfg = ScoringConfig(n_top=4, per_quantile=4, n_random=4, n_hard=4, per_prompt=5)
    return build_scoring_sets(windows, cfg, pool=pool, pool_max=pool_max, embedder=minilm), cfg


DESCRIPTIONS = {f: describe(f) for f in TOPICS}


def words_of(text: str) -> set[str]:
    return {w.rstrip("s") for w in re.findall(r"[a-z]+", text.lower())} - STOP


def described_words(user: str) -> set[str]:
    return words_of(re.search(r"^Description: (.*)$", user, re.M).group(1))


def excerpts(user: str) -> list[str]:
    return [t for _, t in re.findall(r"^Excerpt (\d+): (.*)$", user, re.M)]


def perfect_labels(user: str, i: int) -> str:
    """A judge that knows the truth: detection labels an excerpt 1 iff it has a described word; fuzzing
    iff a marked token is a described word."""
    words = described_words(user)
    labels = []
    for text in excerpts(user):
        if "<<" in user:
            marked = " ".join(re.findall(r"<<(.*?)>>", text))
            labels.append(int(bool(words_of(marked) & words)))
        else:
            labels.append(int(bool(words_of(text) & words)))
    return "[" + ", ".join(map(str, labels)) + "]"


LABEL_ALTS = {"1": [("1", 0.9), ("0", 0.1)], "0": [("0", 0.8), ("1", 0.2)]}


def check_scores(scores, method, judge):
    for f, s in scores.items():
        validate_score(s, f"feature {f}", "score")
        assert s["method"] == method and s["judge"] == judge.name and s["seed"] == 0
        assert 0 <= s["failed"] <= s["n"]


# ---------------------------------------------------------------------------------------------
# Scoring sets
# ---------------------------------------------------------------------------------------------
def test_scoring_sets_positives_negatives_and_hard_negatives(sets):
    items, cfg = sets
    for f, s in items.items():
        assert [w["bin"] for w in s.positives] == [-1] * 4 + [1] * 4 + [0] * 4  # top, then bins high to low
        assert all(window_fires(w, f) for w in s.positives) and s.max_act == 9.0
        assert len(s.random) == 4 and not any(window_fires(w, f) for w in s.random)
        assert 0 < len(s.hard) <= cfg.n_hard
        assert not any(window_fires(w, f) for w in s.hard) and all(not any(w["acts"]) for w in s.hard)
        sims = [w["similarity"] for w in s.hard]
        assert sims == sorted(sims, reverse=True)
        ctx = [w["context"] for w in s.positives + s.random + s.hard]
        assert len(ctx) == len(set(ctx))  # one window per context, no window in two roles


def test_hard_negatives_are_the_most_similar_silent_windows(minilm):
    windows = synthetic_windows()
    near = window(5, ["cat", "food", "on", "the", "table"], set())  # silent for our purposes: pool_max says so
    far = window(6, ["storm", "thunder", "rain"], set())
    pool = [far, near]
    pool_max = {f: np.zeros(2) for f in windows}
    cfg = ScoringConfig(n_top=4, per_quantile=4, n_random=2, n_hard=1)
    items = build_scoring_sets(windows, cfg, pool=pool, pool_max=pool_max, embedder=minilm)
    assert [w["context"] for w in items[0].hard] == [5]
    pool_max[0][1] = 1.0  # now the near window fires for feature 0: it is no negative
    items = build_scoring_sets(windows, cfg, pool=pool, pool_max=pool_max, embedder=minilm)
    assert [w["context"] for w in items[0].hard] == [6]
    # explain contexts are never used, whatever the windows say
    items = build_scoring_sets(windows, cfg, explain_contexts={0: {windows[0]["top"][0]["context"]}})
    assert windows[0]["top"][0]["context"] not in items[0].contexts and len(items[0].positives) == 11


# ---------------------------------------------------------------------------------------------
# Detection and fuzzing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scorer", [detection, fuzzing])
def test_a_perfect_judge_scores_balanced_accuracy_one(sets, judge_server, key_env, scorer):
    items, cfg = sets
    srv = judge_server(perfect_labels, alts=LABEL_ALTS)
    judge = llm_judge(srv, concurrency=2)
    scores = scorer(items, DESCRIPTIONS, judge, cfg, seed=0)
    check_scores(scores, scorer.__name__, judge)
    n = len(items[0].positives) + len(items[0].random) + len(items[0].hard)
    for f, s in scores.items():
        m = s["metrics"]
        assert s["value"] == 1.0 and s["failed"] == 0 and s["n"] == n
        assert m["auroc"] == 1.0 and m["precision"] == 1.0 and m["recall"] == 1.0 and m["f1"] == 1.0
        assert m["random"]["balanced_accuracy"] == 1.0 and m["hard"]["balanced_accuracy"] == 1.0
        assert m["logprob_fraction"] == 1.0 and m["malformed"] == 0 and m["calls"] == -(-n // cfg.per_prompt)
        assert s["tokens_in"] > 0
    assert srv.chat_requests == sum(-(-n // cfg.per_prompt) for _ in items)
    assert all(b["logprobs"] is True for b in srv.bodies)
    # a judge that labels everything 1: recall 1, balanced accuracy 0.5, AUROC 0.5
    srv2 = judge_server(lambda user, i: "[" + ", ".join("1" for _ in excerpts(user)) + "]", alts=LABEL_ALTS)
    s = scorer(items, {0: DESCRIPTIONS[0]}, llm_judge(srv2), cfg, seed=0)[0]
    assert s["value"] == 0.5 and s["metrics"]["recall"] == 1.0 and s["metrics"]["auroc"] == 0.5


def test_fuzzing_marks_negatives_like_an_average_positive(sets):
    items, cfg = sets
    s = items[0]
    marks = fuzz_marks(s, cfg, np.random.default_rng(0))
    n_pos = len(s.positives)
    pos_marks = marks[:n_pos]
    assert all(all(s.positives[i]["acts"][j] > 0 for j in m) for i, m in enumerate(pos_marks))
    k = round(np.mean([len(m) for m in pos_marks]))
    assert all(len(m) == k for m in marks[n_pos:])


def test_malformed_answers_are_counted_and_excluded(sets, judge_server, key_env):
    items, cfg = sets
    items = {0: items[0]}
    srv = judge_server(lambda user, i: "I am not sure." if i % 2 else perfect_labels(user, i), alts=LABEL_ALTS)
    s = detection(items, {0: DESCRIPTIONS[0]}, llm_judge(srv), cfg, seed=0)[0]
    n = len(items[0].positives) + len(items[0].random) + len(items[0].hard)
    sizes = [min(cfg.per_prompt, n - b) for b in range(0, n, cfg.per_prompt)]
    assert s["n"] == n and s["failed"] == sum(sizes[1::2]) > 0
    assert s["metrics"]["malformed"] == len(sizes[1::2]) and s["metrics"]["failed_calls"] == 0
    assert s["value"] == 1.0  # the malformed answers are not scored as wrong
    assert s["metrics"]["n"] == n - s["failed"]


def test_a_judge_failing_every_call_gives_none(sets, judge_server, key_env):
    items, cfg = sets
    srv = judge_server(perfect_labels, script=[("status", 400, {})])
    judge = llm_judge(srv)
    for scorer in (detection, fuzzing, simulation, intruder):
        scores = scorer(items, DESCRIPTIONS, judge, cfg, seed=0)
        check_scores(scores, scorer.__name__, judge)
        for s in scores.values():
            assert s["value"] is None and s["n"] > 0 and s["failed"] == s["n"]
            assert s["metrics"]["failed_calls"] == s["metrics"]["calls"] > 0


def test_descriptions_are_checked_before_any_judge_call(sets, judge_server, key_env, minilm):
    items, cfg = sets
    srv = judge_server(perfect_labels)
    judge = llm_judge(srv)
    for bad in ("", "   ", "x" * 100_000):
        for scorer in (detection, fuzzing, simulation):
            with pytest.raises(DescriptionError, match="feature 1"):
                scorer(items, {0: DESCRIPTIONS[0], 1: bad}, judge, cfg, seed=0)
        with pytest.raises(DescriptionError):
            embedding_score(items, {0: bad}, minilm, cfg)
    assert srv.chat_requests == 0
    with pytest.raises(ConfigError, match="no scoring set"):
        detection(items, {99: "x"}, judge, cfg)
    with pytest.raises(ConfigError, match="LLM judge"):
        detection(items, DESCRIPTIONS, minilm, cfg)
    with pytest.raises(ConfigError, match="embedding judge"):
        embedding_score(items, DESCRIPTIONS, judge, cfg)
    with pytest.raises(ConfigError, match="--per-prompt"):
        detection(items, DESCRIPTIONS, judge, dataclasses.replace(cfg, per_prompt=0))
    assert srv.chat_requests == 0


# ---------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------
def simulating_judge(user: str, i: int) -> str:
    """Predicts 10 for " cat", 2 for " b", 0 for every other token."""
    toks = [json.loads(t) for t in re.findall(r'^\d+\. (".*")$', user, re.M)]
    return "Activations: " + ", ".join({" cat": "10", " b": "2"}.get(t, "0") for t in toks)


def test_simulation_pooled_pearson_equals_the_hand_value(judge_server, key_env):
    pos = dict(window(1, ["a", "cat", "b"], {"cat"}, 4.0), bin=-1)
    pos["acts"] = [0.0, 4.0, 1.0]
    neg = window(2, ["x", "y", "z"], set())
    items = {0: ScoringSet(0, [pos], [neg], [], 4.0)}
    cfg = ScoringConfig(sim_positive=1, sim_negative=1)
    # log-probs: "10" is 10 or 8 (EV 9), "2" is 2 or 0 (EV 1), "0" is sure
    srv = judge_server(simulating_judge, alts={"10": [("10", .5), ("8", .5)], "2": [("2", .5), ("0", .5)]})
    s = simulation(items, {0: "the word cat"}, llm_judge(srv), cfg, seed=0)[0]
    # pooled tokens: true (0, 4, 1, 0, 0, 0); expected values (0, 9, 1, 0, 0, 0): means 5/6 and 5/3;
    # sum of products of deviations 516/18, squared deviations 588/9 and 462/36
    assert s["value"] == pytest.approx((516 / 18) / np.sqrt((588 / 9) * (462 / 36)))
    assert s["metrics"]["logprob_tokens"] == 6 and s["metrics"]["tokens"] == 6 and s["failed"] == 0 and s["n"] == 2
    # without log-probs, the written integers (0, 10, 2, 0, 0, 0): 32 / sqrt(80 * 462/36)
    s = simulation(items, {0: "the word cat"}, llm_judge(srv), dataclasses.replace(cfg, logprobs=False), seed=0)[0]
    assert s["value"] == pytest.approx(32 / np.sqrt(80 * 462 / 36))
    assert s["metrics"]["logprob_tokens"] == 0
    # a malformed answer (wrong count) for the negative window: excluded, counted
    srv2 = judge_server(lambda user, i: simulating_judge(user, i) if i == 0 else "Activations: 0")
    s = simulation(items, {0: "the word cat"}, llm_judge(srv2), cfg, seed=0)[0]
    assert s["failed"] == 1 and s["metrics"]["malformed"] == 1 and s["metrics"]["tokens"] == 3
    assert s["value"] == pytest.approx(np.corrcoef([0, 10, 2], [0, 4, 1])[0, 1])


def test_simulation_on_topic_windows(sets, judge_server, key_env):
    items, cfg = sets

    def judge_rule(user, i):
        words = described_words(user)
        toks = [json.loads(t) for t in re.findall(r'^\d+\. (".*")$', user, re.M)]
        return "Activations: " + ", ".join("8" if words_of(t) & words else "0" for t in toks)

    scores = simulation(items, DESCRIPTIONS, llm_judge(judge_server(judge_rule), concurrency=2), cfg, seed=0)
    for f, s in scores.items():
        ws = simulation_windows(items[f], cfg)
        pred = [8.0 if t.strip() in TOPICS[f] else 0.0 for w in ws for t in w["tokens"]]
        true = [a for w in ws for a in w["acts"]]
        assert s["value"] == pytest.approx(np.corrcoef(pred, true)[0, 1]) and s["value"] > 0.5
        assert s["n"] == cfg.sim_positive + cfg.sim_negative == len(ws) and s["failed"] == 0
        assert s["metrics"]["logprob_tokens"] == len(true)


# ---------------------------------------------------------------------------------------------
# Embedding and intruder
# ---------------------------------------------------------------------------------------------
def test_embedding_separates_the_right_description_from_a_shuffled_one(sets, minilm):
    items, cfg = sets
    judge = minilm
    right = embedding_score(items, DESCRIPTIONS, judge, cfg, seed=0)
    shuffled = embedding_score(items, {f: DESCRIPTIONS[(f + 1) % 4] for f in items}, judge, cfg, seed=0)
    check_scores(right, "embedding", judge)
    r = [s["value"] for s in right.values()]
    w = [s["value"] for s in shuffled.values()]
    assert min(r) >= 0.9 and np.mean(w) <= 0.5 and min(r) - max(w) >= 0.3, (r, w)
    for s in right.values():
        m = s["metrics"]
        assert m["auroc_random"] is not None and m["auroc_hard"] is not None and s["failed"] == 0
        assert s["n"] == m["n_positive"] + m["n_random"] + m["n_hard"]


def test_intruder_with_llm_and_embedding_judges(sets, judge_server, key_env, minilm):
    items, cfg = sets

    def find_intruder(user, i):
        texts = excerpts(user)
        topic = [next((f for f, v in TOPICS.items() if words_of(t) & set(v)), None) for t in texts]
        common = max(set(topic), key=topic.count)
        return f"Excerpt {topic.index(next(t for t in topic if t != common)) + 1}"

    srv = judge_server(find_intruder, alts={str(k): [(str(k), 0.7)] + [(str(j), 0.1) for j in range(1, 6) if j != k][:3]
                                            for k in range(1, 6)})
    judge = llm_judge(srv)
    scores = intruder(items, None, judge, cfg, seed=0)
    check_scores(scores, "intruder", judge)
    for s in scores.values():
        assert s["value"] == 1.0 and s["n"] == cfg.intruder_trials and s["metrics"]["chance"] == 0.2
        assert s["metrics"]["p_correct"] == pytest.approx(0.7)
    # the explanation-free prompt shows no description
    assert all("Description" not in b["messages"][-1]["content"] for b in srv.bodies)
    offline = intruder(items, None, minilm, cfg, seed=0)
    assert np.mean([s["value"] for s in offline.values()]) >= 0.8
    # another seed draws other questions
    srv.bodies.clear()
    intruder(items, None, judge, cfg, seed=1)
    assert len(srv.bodies) == 4 * cfg.intruder_trials


# ---------------------------------------------------------------------------------------------
# A real tiny cache: held-out windows only
# ---------------------------------------------------------------------------------------------
from test_cache import HOOK, ReluDict  # noqa: E402  (the same tiny ReLU dictionary)


def test_scoring_sets_of_a_real_cache_use_held_out_windows_only(tmp_path, minilm):
    rng = np.random.default_rng(0)
    N, T, D = 40, 12, 8
    acts = rng.normal(size=(N * T, D)).astype(np.float32)
    tokens = rng.integers(3, 50, size=(N, T))
    store = write_store(tmp_path / "s.h5", acts={HOOK: acts}, tokens=tokens)
    dic = ReluDict(rng.normal(size=(D, 5)).astype(np.float32), np.array([1.0, 1.5, 2.0, 2.5, 3.0], np.float32))
    ccfg = CacheConfig(top_n=4, n_quantiles=2, per_bin=2, n_negative=3, contexts_per_chunk=8, hist_stride=1)
    cache = FeatureCache(build_cache(store, dic, ccfg, tmp_path / "cache", dictionary_id="relu", progress=False))
    cfg = ScoringConfig(width=6, n_top=3, per_quantile=2, n_random=3, n_hard=3)
    feats = [f for f in range(5) if not cache.dead[f]]
    items = scoring_sets(store, dic, cache, feats, lambda i: f" w{i}", cfg, embedder=minilm)
    codes = np.asarray(dic.encode(acts)).reshape(N, T, -1)
    n_hard = 0
    for f, s in items.items():
        ex = cache.examples(f, EXPLAIN)
        explain = {c for c, _ in ex["top"]} | {c for b in ex["quantiles"] for c, _ in b} | set(ex["negative"])
        assert s.positives and s.contexts.isdisjoint(explain)
        assert held_out_mask(np.asarray(sorted(s.contexts)), ccfg.held_out_fraction, ccfg.seed).all()
        for w in s.positives:
            c, a, b = w["context"], w["start"], w["start"] + len(w["tokens"])
            assert np.allclose(w["acts"], codes[c, a:b, f], atol=1e-5) and max(w["acts"]) > 0
            assert w["tokens"] == [f" w{t}" for t in tokens[c, a:b]]
        for w in s.random:  # the cache's never-firing contexts, or quiet pool windows when those run short
            c, a, b = w["context"], w["start"], w["start"] + len(w["tokens"])
            assert codes[c, 1:, f].max() == 0 or codes[c, a:b, f].max() <= cfg.quiet * s.max_act
        for w in s.hard:
            c, a, b = w["context"], w["start"], w["start"] + len(w["tokens"])
            assert codes[c, a:b, f].max() <= cfg.quiet * s.max_act
        n_hard += len(s.hard)
    assert n_hard > 0
    scores = embedding_score(items, {f: "w7 w9 w11" for f in items}, minilm, cfg, seed=0)
    check_scores(scores, "embedding", minilm)
    assert window_text(items[feats[0]].positives[0]).startswith(" w")
