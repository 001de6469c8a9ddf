"""LLM judges, description checks, and the numbers every scorer shares.

    from featureatlas.eval.explainers import OpenAIExplainer, ResponseCache
    from featureatlas.eval.judges import LLMJudge, binary_metrics, bootstrap_ci, choice_probability
    judge = LLMJudge(OpenAIExplainer(url, "qwen2.5-7b-instruct"), cache=ResponseCache("out/llm-cache"))
    [a] = judge.ask(["Is 2 even? Answer 1 for yes, 0 for no."], max_tokens=2, logprobs=True, seed=0)
    choice_probability(a, ["0", "1"])          # {"0": 0.02, "1": 0.98}, or None without log-probs

Judges (the embedding judge lives in eval/embedder.py) have `.name`, written into every Score's `judge`, and
`.kind`, "llm" or "embedding". An `LLMJudge` wraps an Explainer client (`local` or `openai`; the template
explainer takes no prompts and is refused): `ask` is `Explainer.complete` with the judge seed as the sample
index, so each seed is its own response-cache entry.

Reading judge answers (delphi / OpenAI neuron-simulator style):
- `parse_labels`, `parse_choice`, `parse_activations` turn an answer's text into 0/1 labels, a 1-based choice
  or 0..10 activations, or None when the text is malformed (wrong count, out of range, nothing found);
  `Tally` counts calls, failed calls and malformed answers so that scorers report them apart and never
  score them as wrong.
- `answer_tokens` recovers the generated tokens from an answer's per-token top log-probs (the alternative at
  each position that continues the text); `choice_distributions` gives, at every generated token that is one
  of the choices, the probability of each choice normalised over the choices (P(c) / sum_c' P(c')): e.g.
  P(1) / (P(0) + P(1)) for a label, or the expected value sum_v v P(v) over "0".."10" for a simulated
  activation (`expected_value`).

Metrics: `binary_metrics` (scikit-learn: balanced accuracy (TPR + TNR) / 2, precision, recall, F1, AUROC; None
where undefined) and `bootstrap_ci` (percentile bootstrap of the mean over features).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from featureatlas.activation_store.errors import ConfigError, FeatureAtlasError

MAX_DESCRIPTION_CHARS = 2000
"""A description longer than this is refused (a description is a sentence, not a document)."""


# ---------------------------------------------------------------------------------------------
# Descriptions
# ---------------------------------------------------------------------------------------------
class DescriptionError(FeatureAtlasError, ValueError):
    """A description cannot be scored (empty, or too long to be a description)."""


def check_description(text: Any) -> str:
    """The description stripped of surrounding whitespace; DescriptionError when it is not a string, is empty
    or whitespace, or is longer than MAX_DESCRIPTION_CHARS characters."""
    if not isinstance(text, str):
        raise DescriptionError(f"a description must be a string, got {type(text).__name__}; store the "
                               "explainer's text in the description's 'text' field")
    stripped = text.strip()
    if not stripped:
        raise DescriptionError("the description is empty; describe the feature again (featureatlas describe) "
                               "or leave it out of the evaluation")
    if len(stripped) > MAX_DESCRIPTION_CHARS:
        raise DescriptionError(f"the description is {len(stripped):,} characters long (at most "
                               f"{MAX_DESCRIPTION_CHARS:,}); a description is a sentence: shorten it or describe "
                               "the feature again")
    return stripped


# ---------------------------------------------------------------------------------------------
# The LLM judge
# ---------------------------------------------------------------------------------------------
class LLMJudge:
    """A judge that asks a language model through an Explainer client (local or OpenAI-compatible)."""

    kind = "llm"

    def __init__(self, explainer, *, cache=None):
        backend = getattr(explainer, "backend", None)
        if backend == "template":
            raise ConfigError("the template explainer writes descriptions without a language model and cannot "
                              "judge; use a local (SmolLM2-135M-Instruct) or openai explainer as the judge, or "
                              "the embedding judge for an offline score")
        if not callable(getattr(explainer, "complete", None)) or not backend:
            raise ConfigError(f"LLMJudge needs an Explainer client (eval/explainers.py), got "
                              f"{type(explainer).__name__}")
        self.explainer = explainer
        self.cache = cache
        self.name = f"{explainer.backend}:{explainer.model}"

    def __repr__(self) -> str:
        return f"LLMJudge({self.name!r})"

    def ask(self, prompts: Sequence, *, max_tokens: int, temperature: float = 0.0, logprobs: bool = False,
            seed: int = 0) -> list:
        """One Answer per prompt (a string or chat messages); the seed is the explainer's sample index, so each
        seed is its own cache entry. Failed calls come back as Answers with text None and an error."""
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"the judge seed must be an integer >= 0, got {seed!r}")
        if not prompts:
            return []
        return self.explainer.complete(list(prompts), max_tokens=max_tokens, temperature=temperature,
                                       logprobs=logprobs, first_sample=seed, cache=self.cache)


# ---------------------------------------------------------------------------------------------
# Parsing judge answers
# ---------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """How a scorer's judge calls went: asked, failed (no answer), malformed (an answer we could not read)."""

    calls: int = 0
    failed: int = 0
    malformed: int = 0
    seconds: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0

    def read(self, answer, parser: Callable[..., Any], *args) -> Any:
        """parser(answer.text, *args), or None (counted) when the call failed or the text is malformed."""
        self.calls += 1
        self.seconds += float(getattr(answer, "seconds", 0.0) or 0.0)
        self.tokens_in += int(getattr(answer, "tokens_in", 0) or 0)
        self.tokens_out += int(getattr(answer, "tokens_out", 0) or 0)
        if answer is None or answer.text is None:
            self.failed += 1
            return None
        value = parser(answer.text, *args)
        if value is None:
            self.malformed += 1
        return value

    def as_dict(self) -> dict:
        return {"calls": self.calls, "failed_calls": self.failed, "malformed": self.malformed}


_INT = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)")
_LIST = re.compile(r"\[([^\[\]]*)\]")


def _numbers(text: str) -> list[str]:
    return [m.group(0) for m in _INT.finditer(text)]


def _after_marker(text: str, marker: str | None) -> str:
    if marker:
        i = text.lower().rfind(marker.lower())
        if i >= 0:
            return text[i + len(marker):]
    return text


def parse_labels(text: str | None, n: int) -> list[int] | None:
    """n labels 0/1 from an answer like "[1, 0, 0, 1, 1]" (the last bracketed list; else every number in the
    text); None when the count is not n or a label is not 0 or 1."""
    if not text:
        return None
    lists = _LIST.findall(text)
    nums = _numbers(lists[-1]) if lists else _numbers(text)
    if len(nums) != n or any(x not in ("0", "1") for x in nums):
        return None
    return [int(x) for x in nums]


def parse_choice(text: str | None, n: int) -> int | None:
    """The 1-based choice in an answer like "3" or "Excerpt 3." (the first number in the text; after
    "Answer:" when present); None when there is none or it is outside 1..n."""
    if not text:
        return None
    nums = _numbers(_after_marker(text, "answer:"))
    if not nums or "." in nums[0] or nums[0].startswith("-"):
        return None
    v = int(nums[0])
    return v if 1 <= v <= n else None


def parse_activations(text: str | None, n: int, *, top: int = 10) -> list[int] | None:
    """n integers 0..top from an answer like "Activations: 0, 0, 7, 10" (the numbers after the last
    "Activations:", else all numbers in the text); None when the count is not n or one is out of range."""
    if not text:
        return None
    nums = _numbers(_after_marker(text, "activations:"))
    if len(nums) != n or any("." in x or x.startswith("-") for x in nums):
        return None
    vals = [int(x) for x in nums]
    return vals if all(0 <= v <= top for v in vals) else None


# ---------------------------------------------------------------------------------------------
# Log-probabilities of the answer tokens
# ---------------------------------------------------------------------------------------------
_CORE_STRIP = " \t\r\n[](),;:.\"'"


def token_core(token: str) -> str:
    """A generated token without the spaces and list punctuation around it (" 1," -> "1", "[0" -> "0")."""
    return str(token).strip(_CORE_STRIP)


def answer_tokens(answer) -> list[str] | None:
    """The generated tokens, recovered from per-token top log-probs: at each position the first listed
    alternative that continues the answer's text (a leading whitespace difference is tolerated, for
    tokenizers whose single-token decode drops it). None when the answer has no log-probs or a position has
    no alternative that fits (e.g. a sampled token outside the top-k)."""
    lps = getattr(answer, "logprobs", None)
    text = getattr(answer, "text", None)
    if not lps or text is None:
        return None
    rest, out = text, []
    for pos in lps:
        if not rest:
            break  # e.g. the end-of-sequence token after the text
        pick = None
        for alt in pos:
            tok = str(alt[0])
            if tok and rest.startswith(tok):
                pick, rest = tok, rest[len(tok):]
                break
            if tok and tok.strip() and rest.lstrip().startswith(tok.lstrip()):
                pick, rest = tok, rest.lstrip()[len(tok.lstrip()):]
                break
        if pick is None:
            return None
        out.append(pick)
    return out if not rest.strip() else None


def _distribution(alts: Sequence, choices: Sequence[str]) -> dict[str, float] | None:
    mass = {c: 0.0 for c in choices}
    for alt in alts:
        try:
            core, lp = token_core(alt[0]), float(alt[1])
        except (TypeError, ValueError, IndexError):
            continue
        if core in mass and math.isfinite(lp):
            mass[core] += math.exp(lp)
    total = sum(mass.values())
    if total <= 0:
        return None
    return {c: m / total for c, m in mass.items()}


def choice_positions(answer, choices: Sequence[str]) -> list[tuple[int, str]] | None:
    """[(position, choice)] of every generated token whose core (`token_core`) is one of the choices, in
    order; None when the answer has no log-probs or its tokens cannot be recovered (`answer_tokens`)."""
    toks = answer_tokens(answer)
    if toks is None:
        return None
    wanted = set(map(str, choices))
    return [(i, token_core(t)) for i, t in enumerate(toks) if token_core(t) in wanted]


def choice_distributions(answer, choices: Sequence[str]) -> list[dict[str, float] | None] | None:
    """At every generated token that is one of the choices (`choice_positions`), in order: the probability
    of each choice, P(c) / sum over choices of P(c'), from that position's top log-probs (None at a position
    whose alternatives hold no choice). None when the answer's tokens cannot be recovered."""
    pos = choice_positions(answer, choices)
    if pos is None:
        return None
    return [_distribution(answer.logprobs[i], [str(c) for c in choices]) for i, _ in pos]


def aligned_distributions(answer, choices: Sequence[str], written: Sequence) -> list[dict[str, float] | None] | None:
    """The distributions at the tokens of the values an answer wrote (its last len(written) choice tokens),
    when those tokens are exactly the written values (e.g. no "10" split into "1", "0"); else None."""
    pos = choice_positions(answer, choices)
    k = len(written)
    if pos is None or len(pos) < k or [c for _, c in pos[len(pos) - k:]] != [str(w) for w in written]:
        return None
    return [_distribution(answer.logprobs[i], [str(c) for c in choices]) for i, _ in pos[len(pos) - k:]]


def choice_probability(answer, choices: Sequence[str], position: int | None = None) -> dict[str, float] | None:
    """{choice: probability} normalised over the choices at one generated position: `position`, or (None) the
    first generated token that is a choice (position 0 for a bare answer such as "1"). None when the answer
    has no log-probs or no probability lands on any choice there.

    E.g. for labels, P(1) / (P(0) + P(1)) = choice_probability(a, ["0", "1"])["1"]."""
    lps = getattr(answer, "logprobs", None)
    if not lps:
        return None
    choices = [str(c) for c in choices]
    if position is None:
        toks = answer_tokens(answer)
        if toks is not None:
            position = next((i for i, t in enumerate(toks) if token_core(t) in choices), None)
        if position is None:  # tokens not recoverable: the first position whose best guess is a choice
            position = next((i for i, pos in enumerate(lps) if pos and token_core(pos[0][0]) in choices), 0)
    if not 0 <= position < len(lps):
        return None
    return _distribution(lps[position], choices)


def expected_value(dist: Mapping[str, float] | None) -> float | None:
    """sum_v v * P(v) over a distribution of numeric choices ("0".."10"); None for None."""
    if not dist:
        return None
    return float(sum(float(k) * p for k, p in dist.items()))


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int], score: Sequence[float] | None = None) -> dict:
    """balanced_accuracy = (TPR + TNR) / 2, precision = TP / (TP + FP), recall = TP / (TP + FN),
    f1 = 2 TP / (2 TP + FP + FN), auroc of `score` (or of the predicted labels when no score is given;
    then it equals balanced accuracy), all from scikit-learn, each None where undefined (balanced accuracy
    and AUROC need both classes in y_true; precision needs a predicted positive, recall a true one, F1 either).
    Also the counts n, tp, fp, tn, fn and accuracy."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels and y_pred {y_pred.size}")
    if not np.isin(y_true, (0, 1)).all() or not np.isin(y_pred, (0, 1)).all():
        raise ValueError("binary_metrics takes labels 0 and 1")
    s = np.asarray(score if score is not None else y_pred, dtype=np.float64).ravel()
    if s.shape != y_true.shape:
        raise ValueError(f"score has {s.size} values for {y_true.size} labels")
    n = int(y_true.size)
    tp = int(((y_true == 1) & (y_pred == 1)).sum())
    fp = int(((y_true == 0) & (y_pred == 1)).sum())
    tn = int(((y_true == 0) & (y_pred == 0)).sum())
    fn = int(((y_true == 1) & (y_pred == 0)).sum())
    both = n > 0 and 0 < int(y_true.sum()) < n
    out = {"n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": (tp + tn) / n if n else None}
    out["balanced_accuracy"] = _finite_or_none(balanced_accuracy_score(y_true, y_pred)) if both else None
    out["precision"] = _finite_or_none(precision_score(y_true, y_pred, zero_division=np.nan)) if tp + fp else None
    out["recall"] = _finite_or_none(recall_score(y_true, y_pred, zero_division=np.nan)) if tp + fn else None
    out["f1"] = _finite_or_none(f1_score(y_true, y_pred, zero_division=np.nan)) if tp + fp + fn else None
    out["auroc"] = _finite_or_none(roc_auc_score(y_true, s)) if both and np.isfinite(s).all() else None
    return out


def auroc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float | None:
    """AUROC of scores of positives against negatives (scikit-learn); None when either side is empty."""
    from sklearn.metrics import roc_auc_score

    pos, neg = np.asarray(positive_scores, np.float64), np.asarray(negative_scores, np.float64)
    if not pos.size or not neg.size:
        return None
    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    return _finite_or_none(roc_auc_score(y, np.concatenate([pos, neg])))


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson r = cov(x, y) / (sd(x) sd(y)); None with fewer than 2 values or a constant side."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"pearson of {x.size} and {y.size} values")
    if x.size < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return _finite_or_none(float((dx * dy).sum()) / den) if den > 0 else None


def bootstrap_ci(values: Sequence[float | None], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of the mean of `values` (None entries dropped): resample the values with
    replacement n_boot times, take the (1-level)/2 and (1+level)/2 quantiles of the resampled means
    (Efron & Tibshirani 1993). (None, None) with no value; (v, v) with one."""
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise ConfigError(f"level must lie in (0, 1), got {level!r}")
    v = np.asarray([float(x) for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return None, None
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


__all__ = [
    "MAX_DESCRIPTION_CHARS", "DescriptionError", "check_description", "LLMJudge", "Tally", "parse_labels",
    "parse_choice", "parse_activations", "token_core", "answer_tokens", "choice_positions", "choice_distributions",
    "aligned_distributions",
    "choice_probability", "expected_value", "binary_metrics", "auroc", "pearson", "bootstrap_ci",
]
