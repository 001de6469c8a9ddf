"""The input evaluation of the output-centric paper (Gur-Arieh, Mayan, Agassy, Geiger & Geva 2025,
"Enhancing Automated Interpretability with Output-Centric Feature Descriptions"), and its offline variant.

LLM judge (the paper's protocol):
  1. from the description alone, the judge writes n = 5 sentences that should activate the feature and
     n = 5 neutral ones (`sentences_prompt`; JSON answer, parsed leniently by `parse_sentences`: JSON, or
     "activating"/"neutral" headed lists). An answer that fails or cannot be read as ≥ n sentences of each
     kind is counted in Score.failed and excluded (value None), never scored as a failure of the feature;
  2. every sentence runs through the model as the store's contexts do (BOS + tokens, at most
     `max_sentence_tokens`), the dictionary's hook is captured and encoded, and the sentence's activation is
     the max over its tokens (BOS excluded, as in the cache) of the feature's code;
  3. success ⇔ mean(activating) > mean(neutral), strictly (a feature silent on both sets fails).
  Score: value 1.0 / 0.0 (None when failed), metrics: success, both means, per-sentence activations, the
  sentences. `success_rate` gives the % of features with a bootstrap 95% CI over features.

Embedding judge (offline): given a pool of corpus contexts (e.g. a few hundred held-out contexts,
`held_out_pool`), the judge retrieves the m contexts most similar to the description (cosine of
all-MiniLM-L6-v2 embeddings of the description and the context text), and m random others from the pool
(seeded per feature); the feature's max activation over each context's real tokens ranks them:
  Score value = AUROC(similar = positive class, random = negative) (scikit-learn; 0.5 = no relation),
  metrics.success = AUROC > 0.5.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
import weakref
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError
from featureatlas.eval.adapters import feature_ids, validate_dictionary
from featureatlas.eval.cache import held_out_mask
from featureatlas.eval.judges import auroc, bootstrap_ci, check_description
from featureatlas.eval.probing import pooled_activations

METHOD = "input"


@dataclasses.dataclass
class InputEvalConfig(Config):
    """Settings of the input evaluation (both variants)."""

    n_sentences: int = setting(5, gt=0)
    """Activating and neutral sentences the judge writes per description (the paper: 5 + 5)."""
    answer_tokens: int = setting(600, gt=0)
    """Most tokens the judge may write per answer."""
    temperature: float = setting(0.0, ge=0)
    """Judge sampling temperature (0 = greedy; seeds are separate cache entries either way)."""
    max_sentence_tokens: int = setting(64, ge=2)
    """Tokens per sentence fed to the model, BOS included (longer sentences are cut)."""
    batch: int = setting(32, gt=0)
    """Sentences per forward pass."""
    pool: int = setting(400, gt=0)
    """Offline variant: held-out store contexts the descriptions retrieve from (capped by how many there are)."""
    m: int = setting(20, gt=0)
    """Offline variant: most similar and random pool contexts per feature (each)."""
    contexts_per_chunk: int = setting(32, gt=0)
    """Offline variant: pool contexts encoded at once."""


# ---- the judge's sentences ------------------------------------------------------------------------

SYSTEM = "You help evaluate descriptions of features of a language model. You answer with JSON only."


def sentences_prompt(description: str, n: int = 5) -> list[dict]:
    """Chat messages asking for n activating and n neutral sentences for a description."""
    user = (f'A feature of a language model is described as:\n"{description}"\n\n'
            f"Write {n} different sentences that should make this feature fire strongly (each clearly containing "
            f"what the description names), and {n} different neutral sentences that should not make it fire "
            "(about something unrelated).\nAnswer with JSON only, in exactly this form:\n"
            '{"activating": ["first sentence", ...], "neutral": ["first sentence", ...]}')
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
_MARKER = re.compile(r"^\s*(?:[-*•]|\(?\d+[.):]|\d+\s*-)\s*")


def _clean(item) -> str | None:
    if not isinstance(item, str):
        return None
    s = _MARKER.sub("", item.strip()).strip().strip('"“”\'').strip()
    return s or None


def _from_json(text: str) -> tuple[list, list] | None:
    start, stop = text.find("{"), text.rfind("}")
    if start < 0 or stop <= start:
        return None
    try:
        obj = json.loads(text[start:stop + 1])
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    act = next((v for k, v in obj.items() if "activ" in str(k).lower()), None)
    neu = next((v for k, v in obj.items() if "neutral" in str(k).lower()), None)
    if not isinstance(act, list) or not isinstance(neu, list):
        return None
    return act, neu


def _from_lists(text: str) -> tuple[list, list]:
    sections: dict[str, list] = {"activating": [], "neutral": []}
    current = None
    for line in text.splitlines():
        low = line.strip().lower().strip("#*: ")
        if not low:
            continue
        heading = len(low.split()) <= 4  # "Activating sentences:", "**Neutral:**", "## Neutral examples"
        if heading and "activ" in low:
            current = "activating"
        elif heading and "neutral" in low:
            current = "neutral"
        elif current is not None:
            sections[current].append(line)
    return sections["activating"], sections["neutral"]


def parse_sentences(text: str | None, n: int = 5) -> tuple[list[str], list[str]] | None:
    """(n activating, n neutral) sentences from a judge answer, or None when it holds fewer than n of either.

    Reads a JSON object with keys containing "activ" and "neutral" (code fences and text around it ignored),
    else lists under "activating" / "neutral" headings (numbers, bullets and quotes stripped). Extra sentences
    beyond n are dropped."""
    if not text or not text.strip():
        return None
    body = _FENCE.sub("", text)
    pair = _from_json(body) or _from_lists(body)
    act = [s for s in map(_clean, pair[0]) if s]
    neu = [s for s in map(_clean, pair[1]) if s]
    if len(act) < n or len(neu) < n:
        return None
    return act[:n], neu[:n]


# ---- running sentences through the model --------------------------------------------------------

def sentence_tokens(tokenizer, sentences: Sequence[str], max_tokens: int) -> list[list[int]]:
    """BOS (when the tokenizer has one, as the store's contexts begin) + each sentence's tokens, cut at max_tokens."""
    bos = getattr(tokenizer, "bos_id", None)
    head = [int(bos)] if bos is not None else []
    return [(head + [int(i) for i in tokenizer.encode(s)])[:max_tokens] for s in sentences]


def sentence_max_activations(model, dic, sentences: Sequence[str], features: Sequence[int], *, batch: int = 32,
                             max_tokens: int = 64, exclude_bos: bool = True) -> np.ndarray:
    """[len(sentences)]: max over the sentence's tokens (BOS excluded) of feature features[i]'s activation on
    sentence i (dictionary hook captured from the model, encoded with the dictionary; 0 for an empty sentence).

    Sentences go `batch` at a time, right-padded (with an attention mask) to a multiple of 16 tokens, so few
    shapes are compiled."""
    if len(sentences) != len(features):
        raise ConfigError(f"one feature per sentence: {len(sentences)} sentences, {len(features)} features")
    toks = sentence_tokens(model.tokenizer, sentences, max_tokens)
    feats = np.asarray(features, np.int64)
    pad = model.config.pad_id if model.config.pad_id is not None else 0
    first = 1 if exclude_bos and getattr(model.tokenizer, "bos_id", None) is not None else 0
    out = np.zeros(len(sentences), np.float32)
    for s in range(0, len(toks), batch):
        rows = toks[s:s + batch]
        n = len(rows)
        L = min(max(max_tokens, 1), 16 * -(-max(len(r) for r in rows) // 16))
        ids = np.full((batch, L), pad, np.int32)
        mask = np.zeros((batch, L), np.int32)
        for j, r in enumerate(rows):
            ids[j, :len(r)], mask[j, :len(r)] = r, 1
        mask[n:, 0] = 1  # padding rows: one token, ignored
        _, acts = model.forward(model.params, ids, attention_mask_BxT=mask, capture=(dic.hook,), stop_at="capture")
        x = acts[dic.hook]
        codes = jnp.asarray(dic.encode(x.reshape(batch * L, x.shape[-1]))).reshape(batch, L, -1)
        f_b = np.zeros(batch, np.int64)
        f_b[:n] = feats[s:s + n]
        a = np.asarray(jnp.take_along_axis(codes, jnp.asarray(f_b)[:, None, None], axis=2)[..., 0])
        valid = (mask != 0) & (np.arange(L)[None, :] >= first)
        out[s:s + n] = np.where(valid, np.maximum(a, 0.0), 0.0).max(axis=1)[:n]
    return out


# ---- scores ---------------------------------------------------------------------------------------

def _score(value, judge_name: str, *, n: int, failed: int, seed: int, metrics: dict, seconds: float,
           tokens_in: int = 0, tokens_out: int = 0) -> dict:
    """A Score dict (eval_spec.md)."""
    return {"method": METHOD, "value": None if value is None else float(value), "judge": judge_name, "n": int(n),
            "failed": int(failed), "seed": int(seed), "metrics": metrics, "seconds": round(float(seconds), 4),
            "tokens_in": int(tokens_in), "tokens_out": int(tokens_out)}


def _checked_descriptions(descriptions: Mapping[int, str], n_features: int) -> dict[int, str]:
    """Every description checked before any judge or model call (DescriptionError names the problem)."""
    f = feature_ids(list(descriptions), n_features)
    return {int(g): check_description(descriptions[k]) for g, k in zip(f, descriptions)}


def input_evaluation(model, dic, descriptions: Mapping[int, str], judge, config: InputEvalConfig | None = None, *,
                     seed: int = 0) -> dict[int, dict]:
    """{feature: Score} of the paper's input evaluation with an LLM judge (module docstring)."""
    cfg = (config or InputEvalConfig()).validate()
    if getattr(judge, "kind", None) != "llm":
        raise ConfigError(f"the input evaluation's LLM variant needs an LLM judge, got {getattr(judge, 'name', judge)!r}; "
                          "use embedding_input_evaluation for the embedding judge")
    desc = _checked_descriptions(descriptions, dic.n_features)
    validate_dictionary(dic, model=model)
    feats = list(desc)
    answers = judge.ask([sentences_prompt(desc[f], cfg.n_sentences) for f in feats], max_tokens=cfg.answer_tokens,
                        temperature=cfg.temperature, seed=seed)
    parsed = {}
    for f, a in zip(feats, answers):
        parsed[f] = parse_sentences(a.text, cfg.n_sentences) if a is not None and a.ok else None
    sents, owners = [], []
    for f in feats:
        if parsed[f] is not None:
            for s in parsed[f][0] + parsed[f][1]:
                sents.append(s)
                owners.append(f)
    t1 = time.perf_counter()
    acts = sentence_max_activations(model, dic, sents, owners, batch=cfg.batch, max_tokens=cfg.max_sentence_tokens) \
        if sents else np.zeros(0, np.float32)
    t_model = (time.perf_counter() - t1) / max(1, sum(p is not None for p in parsed.values()))
    out, i, n = {}, 0, cfg.n_sentences
    for f, a in zip(feats, answers):
        cost = dict(tokens_in=getattr(a, "tokens_in", 0) or 0, tokens_out=getattr(a, "tokens_out", 0) or 0)
        secs = (getattr(a, "seconds", 0.0) or 0.0) if a is not None else 0.0
        if parsed[f] is None:
            why = "judge call failed: " + str(a.error) if a is None or not a.ok else "malformed answer"
            out[f] = _score(None, judge.name, n=0, failed=1, seed=seed, seconds=secs,
                            metrics={"success": None, "error": why, "answer": None if a is None else a.text}, **cost)
            continue
        act, neu = acts[i:i + n], acts[i + n:i + 2 * n]
        i += 2 * n
        success = bool(act.mean() > neu.mean())
        out[f] = _score(float(success), judge.name, n=1, failed=0, seed=seed, seconds=secs + t_model, **cost,
                        metrics={"success": success, "mean_activating": float(act.mean()),
                                 "mean_neutral": float(neu.mean()), "activating_acts": [float(v) for v in act],
                                 "neutral_acts": [float(v) for v in neu], "activating": parsed[f][0],
                                 "neutral": parsed[f][1]})
    return out


def success_rate(scores: Mapping[int, dict], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """% of scored features whose evaluation succeeded (metrics.success), with a bootstrap 95% CI over features;
    failed (unscored) features are counted apart."""
    ok = [bool(s["metrics"]["success"]) for s in scores.values() if s.get("value") is not None]
    failed = sum(1 for s in scores.values() if s.get("value") is None)
    lo, hi = bootstrap_ci([float(v) for v in ok], n_boot=n_boot, seed=seed)
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    return {"percent": pct(float(np.mean(ok)) if ok else None), "ci": [pct(lo), pct(hi)], "n": len(ok),
            "failed": failed}


# ---- offline variant: the embedding judge --------------------------------------------------------

def held_out_pool(store, n: int | None, *, seed: int = 0, held_out_fraction: float = 0.5, cache_seed: int = 0) -> np.ndarray:
    """n contexts (sorted ids; None = all) drawn with `seed` from the feature cache's held-out split (cache settings
    held_out_fraction / seed) among contexts with a real token after BOS."""
    ctx = np.flatnonzero(held_out_mask(np.arange(store.n_contexts), held_out_fraction, cache_seed)
                         & (np.asarray(store.n_valid) > 1))
    if n is None:
        n = len(ctx)
    if len(ctx) < n:
        raise ConfigError(f"the store has {len(ctx)} held-out contexts, {n} were asked for; lower the pool size")
    return np.sort(np.random.default_rng([seed, 23]).choice(ctx, size=n, replace=False))


def context_texts(store, tokenizer, contexts) -> list[str]:
    """Text of each context's real tokens (BOS excluded)."""
    return [tokenizer.decode([int(t) for t in store.tokens[int(c), 1:int(store.n_valid[int(c)])]]) for c in contexts]


def embedding_input_evaluation(judge, descriptions: Mapping[int, str], pool_texts: Sequence[str], pool_acts_NxF,
                               *, m: int = 20, seed: int = 0) -> dict[int, dict]:
    """{feature: Score} of the offline input evaluation (module docstring).

    pool_acts_NxF: the features' max activation on each pool context, column j for the j-th key of
    `descriptions` (e.g. `pooled_activations(store, dic, pool, how="max", features=list(descriptions))[0]`)."""
    if getattr(judge, "kind", None) != "embedding":
        raise ConfigError(f"embedding_input_evaluation needs the embedding judge, got {getattr(judge, 'name', judge)!r}")
    feats = [int(f) for f in descriptions]
    desc = {f: check_description(descriptions[f]) for f in feats}
    A = np.asarray(pool_acts_NxF, np.float64)
    N = len(pool_texts)
    if A.shape != (N, len(feats)):
        raise ConfigError(f"pool_acts_NxF must be [{N} pool contexts, {len(feats)} features], got {A.shape}")
    if m < 1 or 2 * m > N:
        raise ConfigError(f"m={m} similar + {m} random contexts need a pool of at least {2 * m}; the pool has {N}")
    t0 = time.perf_counter()
    sim = judge.similarity([desc[f] for f in feats], list(pool_texts))
    per = (time.perf_counter() - t0) / max(len(feats), 1)
    out = {}
    for j, f in enumerate(feats):
        order = np.lexsort((np.arange(N), -sim[j]))
        pos = order[:m]
        rest = np.setdiff1d(np.arange(N), pos)
        neg = np.sort(np.random.default_rng([seed, f, 29]).choice(rest, size=m, replace=False))
        value = auroc(A[pos, j], A[neg, j])
        out[f] = _score(value, judge.name, n=2 * m, failed=0, seed=seed, seconds=per,
                        metrics={"success": None if value is None else bool(value > 0.5),
                                 "similar": [int(i) for i in pos], "random": [int(i) for i in neg],
                                 "mean_similar": float(A[pos, j].mean()), "mean_random": float(A[neg, j].mean()),
                                 "similarity_similar": float(sim[j, pos].mean()),
                                 "similarity_random": float(sim[j, neg].mean())})
    return out


_POOL_MEMO: dict = {}


def pool_max_activations(store, dic, contexts, *, contexts_per_chunk: int = 32) -> np.ndarray:
    """[len(contexts), F]: every feature's max activation over each pool context's real tokens (BOS excluded).

    The latest result is memoised (one entry: same dictionary object, store file and size, and contexts), so
    scoring the features block by block encodes the pool once, not once per block."""
    contexts = np.asarray(contexts, np.int64)
    key = (str(store.path), int(store.n_committed), contexts.tobytes())
    hit = _POOL_MEMO.get("entry")
    if hit is not None and hit[0]() is dic and hit[1] == key:
        return hit[2]
    acts, _ = pooled_activations(store, dic, contexts, how="max", contexts_per_chunk=contexts_per_chunk)
    try:
        _POOL_MEMO["entry"] = (weakref.ref(dic), key, acts)
    except TypeError:  # a dictionary object that cannot be weakly referenced: no memo
        _POOL_MEMO.pop("entry", None)
    return acts


def offline_input_evaluation(store, dic, tokenizer, descriptions: Mapping[int, str], judge, contexts,
                             config: InputEvalConfig | None = None, *, seed: int = 0) -> dict[int, dict]:
    """The offline variant end to end: the features' max activations on the pool `contexts` (store context ids,
    e.g. `held_out_pool(store, 400)`; Score metrics index into this list), their texts, then
    `embedding_input_evaluation`."""
    cfg = (config or InputEvalConfig()).validate()
    desc = _checked_descriptions(descriptions, dic.n_features)
    contexts = np.asarray(contexts, np.int64)
    if 2 * cfg.m > len(contexts):
        raise ConfigError(f"m={cfg.m} similar + {cfg.m} random contexts need a pool of at least {2 * cfg.m}; "
                          f"{len(contexts)} contexts were given")
    feats = list(desc)
    acts = pool_max_activations(store, dic, contexts, contexts_per_chunk=cfg.contexts_per_chunk)[:, feats]
    return embedding_input_evaluation(judge, desc, context_texts(store, tokenizer, contexts), acts, m=cfg.m, seed=seed)
