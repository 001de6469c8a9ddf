"""Output-side evaluations of feature descriptions: does a description predict what the feature does
to the model's output when we steer with it?

Two protocols, each split into a generation step (model only: steer, generate; cacheable and shared by
every description and judge) and a judging step (descriptions + a judge):

**Output evaluation** (Gur-Arieh, Mayan, Agassy, Geiger, Geva 2025, "Enhancing Automated Interpretability
with Output-Centric Feature Descriptions"), `output_generations` then `output_evaluation`:
  1. For each feature and each signed KL target t in {+0.25, +0.5, −0.25, −0.5}, the steering strength is
     found by bisection in [1, 1000] (negated for negative targets) so that the mean per-token
     KL(clean ‖ steered) over the prompts lands in [|t|, |t| + 0.1] (`steering.kl_calibrate`, all
     (feature, target) pairs in one batched search). SAE latents are clamped to the strength with the
     reconstruction error kept (clamp_latent, as the paper); other directions add α · unit direction.
  2. At every reached target, one generation of 25 new tokens at temperature 0.75 after each prompt
     ("The explanation is simple:", "I think", "We"), steering at every position.
     Targets a feature cannot reach within the range get no texts ([]): they are reported (count and
     which, `output_summary`), never scored as failures of the description.
  3. Trials. `group="target"` (default, as the paper judges one set per target): one trial per reached
     target t; the feature's set is its texts at t (one per prompt × sample). `group="sign"`: one trial
     per sign (texts of both targets of that sign); `group="all"`: one trial with every text.
     The two distractor sets are the sets of two other features, drawn uniformly without replacement
     from the pool (`pool`, default every feature of the generations, other than this one) among those
     that have texts in the same group, so the three sets come from equally strong steering; the three sets are shown
     in random order. Both draws use a generator seeded by (seed, feature, group): a trial does not
     depend on which other features are evaluated in the same call, only on the pool.
     A trial without two eligible distractors is not formed (reported as "no_distractors").
  4. The judge picks one set; success when it picks the feature's.
       - LLM judge: one prompt (`output_judge_prompt`) asking for "1", "2" or "3"; the choice is the
         most probable of those first tokens (`judges.choice_probability` over the answer's log-probs)
         when the backend returns log-probs, else parsed from the text (`judges.parse_choice`); an answer that
         is neither is malformed: counted in "failed", excluded.
       - Embedding judge: for each set, the mean over its texts of cosine(description, text), i.e.
         e_desc · mean_i e_i with unit embeddings (not the cosine with the normalised centroid, which
         divides by ‖mean_i e_i‖ and so favours diverse sets); the set with the largest value is picked.
         The margin (feature's value − best other) is kept per trial.
  Per feature: value = correct / judged trials (None when none could be judged); chance = 1/3.
  Over features: `output_summary` gives the mean with a bootstrap 95% CI over features.

**Steering evaluation** (Shafran, Geiger, Geva 2025, the SNMF paper), `steering_generations` then
`steering_evaluation`:
  1. Unit feature directions (α · v/‖v‖ added at every position; SAE latents clamp with code_fn), KL
     targets {0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5} on the last prompt token of "I think that", both
     signs; α by bisection in [1, 2000], 20 iterations, band (tolerance) 0.01.
  2. At every reached (sign, target): 8 generations of 50 tokens (top-k 30, top-p 0.3, temperature 1),
     and the capability cost: mean per-token NLL increase on held-out corpus sequences
     (`steering.capability_cost`). Unsteered generations with the same sampling calibrate the offline
     judge.
  3. Per generated text, concept c ∈ {0, 1, 2} and fluency φ ∈ {0, 1, 2}; score = harmonic mean
     2cφ/(c+φ), 0 if either is 0 (`harmonic_score`).
       - LLM judge: two prompts per text (`concept_prompt` with the description, `fluency_prompt`
         without; the fluency answer is therefore shared by every description through the judge's
         response cache); a rating is the most probable of "0", "1", "2" (log-probs) or parsed; a
         malformed rating fails that text (counted, excluded).
       - Offline (embedding judge + the unsteered model): concept from s = cosine(description, text),
         compared with the unsteered texts' cosines to the same description: c = 2 if s > their 95th
         percentile, 1 if s > their median, else 0 (`concept_level`). Fluency from the perplexity of
         the text under the unsteered model (continuation tokens given the prompt), compared with the
         unsteered texts' perplexities: φ = 2 if ppl ≤ their 95th percentile, 1 if ppl ≤ 2 × that,
         else 0 (`fluency_level`).
  4. Per (sign, target): mean concept, fluency and score over the judged texts, α, reached KL and
     nll_increase. The feature's value = max over the reached strengths of the mean score (the best
     strength, as the SNMF paper reports per feature); details in Score["metrics"].

Generated texts are the continuations only (the prompt is shared by every set and would only dilute
the embedding judge). The output evaluation's LLM judge sees the continuations (the three sets share
the prompts); the steering evaluation's sees prompt + continuation.

For the evaluate job: a feature's generations do not depend on which other features were generated in
the same call (per-pair strength search; sampling keys shared by all rows), and the unsteered baseline
depends only on the model, the config and the seed, so generations can be cached per feature and
reassembled; pass the generations of the whole distractor pool (not only the block being judged) so
that trials do not depend on blocking.

Generations are plain JSON-able dicts; after a JSON round trip the feature keys (int) and the target keys
(float) become strings, and both evaluations accept that.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError, FeatureAtlasError

OUTPUT_METHOD = "output"
STEERING_METHOD = "steering"
GROUPS = ("target", "sign", "all")


class OutputEvalError(FeatureAtlasError, ValueError):
    """Generations, descriptions or vectors that do not fit together; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OutputEvalConfig(Config):
    """The output evaluation of Gur-Arieh et al. 2025 (defaults: the paper's protocol)."""

    targets: tuple[float, ...] = setting((0.25, 0.5, -0.25, -0.5))
    """Signed KL targets: the strength is searched so KL(clean||steered) lies in [|t|, |t|+band]; its sign is t's."""
    band: float = setting(0.1, gt=0)
    """Width of the accepted KL interval above each target."""
    lo: float = setting(1.0, gt=0)
    """Smallest steering strength searched (absolute value)."""
    hi: float = setting(1000.0, gt=0)
    """Largest steering strength searched (absolute value); a target not reached within [lo, hi] is reported."""
    iters: int = setting(20, gt=0)
    """Bisection iterations of the strength search."""
    positions: str = setting("all", choices=("all", "last"))
    """Positions the KL is averaged over: every prompt position (the paper) or the last one."""
    prompts: tuple[str, ...] = setting(("The explanation is simple:", "I think", "We"))
    """Prompts the KL is measured on and the generations continue."""
    n_new: int = setting(25, gt=0)
    """Tokens generated per text."""
    temperature: float = setting(0.75, ge=0)
    """Sampling temperature of the generations (0 = greedy)."""
    n_samples: int = setting(1, gt=0)
    """Generations per prompt and target."""
    group: str = setting("target", choices=GROUPS)
    """What one judge trial shows: the texts of one target (the paper), of one sign, or all of a feature's."""
    n_sets: int = setting(3, ge=2)
    """Sets the judge chooses among (the feature's + n_sets-1 random features'); chance is 1/n_sets."""
    judge_max_tokens: int = setting(4, gt=0)
    """Tokens the LLM judge may answer with (the choice is its first token)."""
    batch: int = setting(64, gt=0)
    """(feature, target) pairs per batched strength search."""


@dataclasses.dataclass
class SteeringEvalConfig(Config):
    """The steering evaluation of Shafran et al. 2025 (SNMF paper; defaults: its protocol)."""

    targets: tuple[float, ...] = setting((0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5))
    """KL targets (positive); each is run with every sign in --signs."""
    signs: tuple[int, ...] = setting((1, -1))
    """Steering signs (+1: add the direction, -1: subtract it)."""
    band: float = setting(0.01, gt=0)
    """Tolerance: a target t is reached when the KL lies in [t, t+band]."""
    lo: float = setting(1.0, gt=0)
    """Smallest strength alpha searched."""
    hi: float = setting(2000.0, gt=0)
    """Largest strength alpha searched; a target not reached within [lo, hi] is reported."""
    iters: int = setting(20, gt=0)
    """Bisection iterations of the strength search."""
    positions: str = setting("last", choices=("all", "last"))
    """Where the KL is measured: the last prompt token (the paper) or every position."""
    prompt: str = setting("I think that")
    """Prompt the KL is measured on and the generations continue."""
    n_samples: int = setting(8, gt=0)
    """Generations per strength."""
    n_new: int = setting(50, gt=0)
    """Tokens per generation."""
    temperature: float = setting(1.0, ge=0)
    """Sampling temperature (0 = greedy)."""
    top_k: int = setting(30, ge=0)
    """Top-k sampling (0 = off)."""
    top_p: float = setting(0.3, gt=0, le=1)
    """Nucleus sampling mass (1 = off)."""
    n_baseline: int = setting(64, ge=4)
    """Unsteered generations the offline judge is calibrated on."""
    concept_hi: float = setting(0.95, gt=0, lt=1)
    """Offline concept 2: similarity above this quantile of the unsteered texts' similarities."""
    concept_mid: float = setting(0.5, gt=0, lt=1)
    """Offline concept 1: similarity above this quantile of the unsteered texts' similarities."""
    fluency_q: float = setting(0.95, gt=0, le=1)
    """Offline fluency 2: perplexity at most this quantile of the unsteered texts' perplexities."""
    fluency_factor: float = setting(2.0, ge=1)
    """Offline fluency 1: perplexity at most this factor times that quantile."""
    capability_sequences: int = setting(8, gt=0)
    """Corpus sequences of up to 64 tokens the capability cost (NLL increase) is measured on."""
    capability: bool = setting(True)
    """Measure the capability cost (NLL increase on held-out corpus text) of every reached strength."""
    judge_max_tokens: int = setting(4, gt=0)
    """Tokens the LLM judge may answer with (the rating is its first token)."""
    batch: int = setting(64, gt=0)
    """(feature, strength) pairs per batched strength search."""

    def validate(self):
        super().validate()
        if any(not (isinstance(t, (int, float)) and t > 0) for t in self.targets) or not self.targets:
            raise ConfigError(f"--targets must be positive KL values, got {list(self.targets)}")
        if not self.signs or any(s not in (1, -1) for s in self.signs):
            raise ConfigError(f"--signs must be 1 and/or -1, got {list(self.signs)}")
        if self.concept_mid >= self.concept_hi:
            raise ConfigError(f"--concept-mid ({self.concept_mid}) must be below --concept-hi ({self.concept_hi})")
        if self.lo >= self.hi:
            raise ConfigError(f"--lo ({self.lo}) must be below --hi ({self.hi})")
        return self


def _validate_output_cfg(cfg: OutputEvalConfig) -> OutputEvalConfig:
    cfg.validate()
    if not cfg.targets or any(not isinstance(t, (int, float)) or t == 0 for t in cfg.targets):
        raise ConfigError(f"--targets must be nonzero signed KL values, got {list(cfg.targets)}")
    if len(set(map(float, cfg.targets))) != len(cfg.targets):
        raise ConfigError(f"--targets has a repeated value: {list(cfg.targets)}")
    if not cfg.prompts or any(not p.strip() for p in cfg.prompts):
        raise ConfigError("--prompts must be one or more non-empty prompts")
    if cfg.lo >= cfg.hi:
        raise ConfigError(f"--lo ({cfg.lo}) must be below --hi ({cfg.hi})")
    return cfg


# ---------------------------------------------------------------------------------------------
# Keys, seeds, small helpers
# ---------------------------------------------------------------------------------------------
def feature_key(k):
    """A feature id as used in generations/descriptions: an int when it looks like one (JSON made it a str)."""
    if isinstance(k, (int, np.integer)):
        return int(k)
    if isinstance(k, str) and re.fullmatch(r"-?\d+", k.strip()):
        return int(k)
    return k


def target_key(t) -> float:
    """A signed target as a float (JSON object keys are strings)."""
    try:
        return float(t)
    except (TypeError, ValueError):
        raise OutputEvalError(f"generation key {t!r} is not a signed KL target; the generations must come "
                              "from output_generations / steering_generations") from None


def _id_int(x) -> int:
    return int(x) & 0xFFFFFFFF if isinstance(x, (int, np.integer)) else zlib.crc32(str(x).encode())


def trial_rng(seed: int, feature, group) -> np.random.Generator:
    """The generator of one trial's draws, from (seed, feature, group) only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, _id_int(feature), zlib.crc32(str(group).encode())])


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_descriptions(descriptions: Mapping) -> dict:
    from featureatlas.eval.judges import DescriptionError, check_description

    if not isinstance(descriptions, Mapping) or not descriptions:
        raise OutputEvalError("descriptions must be a non-empty {feature: text} mapping; describe the features "
                              "first (featureatlas describe)")
    out = {}
    for f, text in descriptions.items():
        if not isinstance(text, str):
            raise DescriptionError(f"feature {f!r}: the description is a {type(text).__name__}, not text")
        try:
            out[feature_key(f)] = check_description(text)
        except DescriptionError as e:
            raise DescriptionError(f"feature {f!r}: {e}") from None
    return out


def _bootstrap(values, seed: int = 0):
    from featureatlas.eval.judges import bootstrap_ci

    return list(bootstrap_ci(values, seed=seed)) if len(values) else None


# ---------------------------------------------------------------------------------------------
# Judge answers: choice and ratings
# ---------------------------------------------------------------------------------------------
def answer_choice(answer, options: Sequence[str], tally=None) -> tuple[str | None, dict | None]:
    """(chosen option, the options' probabilities or None) of a judge Answer; (None, None) for a failed call
    or a malformed answer (counted in `tally`, a judges.Tally, when given).

    With log-probs: the most probable option at the first generated token that is an option
    (`judges.choice_probability`); otherwise (or when no probability lands on an option) the option the
    text names: `judges.parse_choice` for options "1".."n", `judges.parse_activations(text, 1, top)` for
    ratings "0".."top".
    """
    from featureatlas.eval import judges

    options = [str(o) for o in options]
    if tally is not None:
        tally.calls += 1
        tally.seconds += float(getattr(answer, "seconds", 0.0) or 0.0)
        tally.tokens_in += int(getattr(answer, "tokens_in", 0) or 0)
        tally.tokens_out += int(getattr(answer, "tokens_out", 0) or 0)
    if answer is None or getattr(answer, "text", None) is None:
        if tally is not None:
            tally.failed += 1
        return None, None
    probs = judges.choice_probability(answer, options) if getattr(answer, "logprobs", None) else None
    if probs and max(probs.values()) > 0:
        return max(options, key=lambda o: probs.get(o, 0.0)), probs
    if options[0] == "1":
        c = judges.parse_choice(answer.text, len(options))
        choice = None if c is None else str(c)
    else:
        v = judges.parse_activations(answer.text, 1, top=len(options) - 1)
        choice = None if v is None else str(v[0])
    if choice is None and tally is not None:
        tally.malformed += 1
    return choice, None


def harmonic_score(concept, fluency) -> float:
    """The SNMF paper's steering score: harmonic mean 2·c·φ/(c+φ) of concept c and fluency φ (0..2),
    0 when either is 0."""
    c, f = float(concept), float(fluency)
    if c <= 0 or f <= 0:
        return 0.0
    return 2.0 * c * f / (c + f)


def concept_level(similarity: float, baseline_similarities, *, hi: float = 0.95, mid: float = 0.5) -> int:
    """Offline concept rating 0/1/2: 2 when the similarity exceeds the `hi` quantile of the unsteered
    texts' similarities to the same description, 1 when it exceeds their `mid` quantile, else 0."""
    base = np.asarray(baseline_similarities, float)
    if similarity > np.quantile(base, hi):
        return 2
    return 1 if similarity > np.quantile(base, mid) else 0


def fluency_level(perplexity: float, baseline_perplexities, *, q: float = 0.95, factor: float = 2.0) -> int:
    """Offline fluency rating 0/1/2: 2 when the perplexity is at most the `q` quantile of the unsteered
    texts' perplexities, 1 when at most `factor` times that, else 0 (NaN/inf perplexity: 0)."""
    if not np.isfinite(perplexity):
        return 0
    ref = float(np.quantile(np.asarray(baseline_perplexities, float), q))
    if perplexity <= ref:
        return 2
    return 1 if perplexity <= factor * ref else 0


# ---------------------------------------------------------------------------------------------
# Output evaluation: trials and judging
# ---------------------------------------------------------------------------------------------
def normalize_generations(generations: Mapping) -> dict:
    """{feature: {signed target (float): [texts]}} with int feature keys and float target keys."""
    if not isinstance(generations, Mapping):
        raise OutputEvalError("generations must be the {feature: {target: [texts]}} mapping that "
                              "output_generations returns")
    out = {}
    for f, per in generations.items():
        if not isinstance(per, Mapping):
            raise OutputEvalError(f"generations of feature {f!r} must map targets to lists of texts")
        row = {}
        for t, texts in per.items():
            if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
                raise OutputEvalError(f"generations of feature {f!r} at target {t!r} must be a list of texts")
            row[target_key(t)] = [str(x) for x in texts]
        out[feature_key(f)] = row
    return out


def group_of(target: float, group: str):
    """The trial group a signed target belongs to: the target itself, its sign ('+'/'-'), or 'all'."""
    if group == "target":
        return float(target)
    if group == "sign":
        return "+" if target > 0 else "-"
    return "all"


def group_sets(gens_f: Mapping[float, list], group: str) -> dict:
    """{group: texts} of one feature's generations (only groups with texts; targets in sorted order)."""
    out: dict = {}
    for t in sorted(gens_f):
        if gens_f[t]:
            out.setdefault(group_of(t, group), []).extend(gens_f[t])
    return out


@dataclasses.dataclass
class Trial:
    """One judge question: the sets of `shown` features (in this order) for `group`; `answer` = index
    of `feature` in `shown`."""

    feature: Any
    group: Any
    shown: tuple
    answer: int


def output_trials(generations: Mapping, features: Sequence, *, group: str = "target", n_sets: int = 3,
                  seed: int = 0, pool: Sequence | None = None) -> tuple[list[Trial], dict]:
    """The trials of `features` (module docstring, step 3) and {feature: {group: reason}} of the groups
    no trial could be formed for ("no_distractors"). pool: features whose sets may be distractors
    (default: every feature of the generations)."""
    gens = normalize_generations(generations)
    sets = {f: group_sets(g, group) for f, g in gens.items()}
    if pool is not None:
        pool = {feature_key(f) for f in pool}
        absent = sorted((f for f in pool if f not in sets), key=_id_int)
        if absent:
            raise OutputEvalError(f"the distractor pool names features {absent[:5]} that have no generations")
    eligible: dict = {}
    for f in sorted(sets if pool is None else pool, key=_id_int):
        for g in sets[f]:
            eligible.setdefault(g, []).append(f)
    trials, skipped = [], {}
    for f in features:
        f = feature_key(f)
        for g in sets.get(f, {}):
            cands = [o for o in eligible[g] if o != f]
            if len(cands) < n_sets - 1:
                skipped.setdefault(f, {})[_gname(g)] = "no_distractors"
                continue
            rng = trial_rng(seed, f, _gname(g))
            others = [cands[i] for i in rng.choice(len(cands), size=n_sets - 1, replace=False)]
            shown = [f] + others
            order = rng.permutation(n_sets)
            shown = tuple(shown[i] for i in order)
            trials.append(Trial(f, g, shown, shown.index(f)))
    return trials, skipped


def _gname(g) -> str:
    """A group as a JSON key: '+0.25', '-0.5', '+', '-', 'all'."""
    return f"{g:+g}" if isinstance(g, float) else str(g)


def output_judge_prompt(description: str, sets: Sequence[Sequence[str]]) -> str:
    """The LLM judge's question: which of the numbered sets of texts was generated while amplifying the
    feature with this description. Texts are shown one per line (whitespace collapsed)."""
    n = len(sets)
    names = ", ".join(str(i + 1) for i in range(n - 1)) + f" or {n}"
    lines = [
        "A language model generated the sets of texts below. Each set was generated while one internal "
        "feature of the model was amplified, which changes what the model writes.",
        "",
        f'Feature description: "{_one_line(description)}"',
        "",
        "Which set was generated while amplifying the feature with this description?",
        "",
    ]
    for i, texts in enumerate(sets):
        lines.append(f"Set {i + 1}:")
        lines.extend(f"- {_one_line(t)}" for t in texts)
        lines.append("")
    lines.append(f"Answer with the number of the set only: {names}.")
    return "\n".join(lines)


def _judge_embedding(judge, trials, descriptions, sets) -> list[dict]:
    """Per trial {"picked": index, "margin": feature's value - best other, "values": [...]} (module doc)."""
    texts = sorted({t for tr in trials for f in tr.shown for t in sets[f][tr.group]})
    descs = sorted({descriptions[tr.feature] for tr in trials})
    if not trials:
        return []
    E_text = np.asarray(judge.embed(texts), np.float32)
    E_desc = np.asarray(judge.embed(descs), np.float32)
    row = {t: i for i, t in enumerate(texts)}
    drow = {d: i for i, d in enumerate(descs)}
    means: dict = {}
    out = []
    for tr in trials:
        d = E_desc[drow[descriptions[tr.feature]]]
        vals = []
        for f in tr.shown:
            key = (f, tr.group)
            if key not in means:
                means[key] = E_text[[row[t] for t in sets[f][tr.group]]].mean(axis=0)
            vals.append(float(d @ means[key]))
        picked = int(np.argmax(vals))
        other = max(v for i, v in enumerate(vals) if i != tr.answer)
        out.append({"picked": picked, "margin": vals[tr.answer] - other, "values": vals})
    return out


def _judge_llm(judge, trials, descriptions, sets, cfg: OutputEvalConfig, seed: int) -> list[dict]:
    """Per trial {"picked": index | None, "p_correct": prob | None, "error"?, cost}."""
    from featureatlas.eval.judges import Tally

    prompts = [output_judge_prompt(descriptions[tr.feature], [sets[f][tr.group] for f in tr.shown])
               for tr in trials]
    if not prompts:
        return []
    answers = judge.ask(prompts, max_tokens=cfg.judge_max_tokens, temperature=0.0, logprobs=True, seed=seed)
    options = [str(i + 1) for i in range(cfg.n_sets)]
    out = []
    for tr, a in zip(trials, answers):
        tally = Tally()
        choice, probs = answer_choice(a, options, tally)
        rec = {"picked": None if choice is None else int(choice) - 1,
               "p_correct": None if probs is None else probs.get(options[tr.answer], 0.0),
               "seconds": tally.seconds, "tokens_in": tally.tokens_in, "tokens_out": tally.tokens_out,
               "failed_call": bool(tally.failed), "malformed": bool(tally.malformed)}
        if choice is None:
            rec["error"] = (getattr(a, "error", None) or f"malformed answer {str(a.text)[:80]!r}")
        out.append(rec)
    return out


def _check_judge(judge) -> str:
    """The judge's kind ("llm" or "embedding"); ConfigError for anything else."""
    kind = getattr(judge, "kind", None)
    if kind not in ("llm", "embedding") or not isinstance(getattr(judge, "name", None), str):
        raise ConfigError(f"the judge must be an LLMJudge (eval/judges.py) or an EmbeddingJudge (eval/embedder.py) "
                          f"with .kind 'llm' or 'embedding' and a .name, got {type(judge).__name__} (kind {kind!r})")
    return kind


def judge_output_trials(trials: Sequence[Trial], descriptions: Mapping, generations: Mapping, judge,
                        cfg: OutputEvalConfig | None = None, *, seed: int = 0) -> list[dict]:
    """The judge's verdict per trial: {"picked", "correct" (None when the answer was malformed), and
    "margin" (embedding) or "p_correct" (LLM with log-probs), "error"}."""
    cfg = cfg or OutputEvalConfig()
    gens = normalize_generations(generations)
    sets = {f: group_sets(g, cfg.group) for f, g in gens.items()}
    descriptions = {feature_key(f): d for f, d in descriptions.items()}
    if _check_judge(judge) == "embedding":
        verdicts = _judge_embedding(judge, trials, descriptions, sets)
    else:
        verdicts = _judge_llm(judge, trials, descriptions, sets, cfg, seed)
    for tr, v in zip(trials, verdicts):
        v["correct"] = None if v["picked"] is None else v["picked"] == tr.answer
    return verdicts


def output_evaluation(model, dic_or_vectors, hook, descriptions: Mapping, judge, cfg: OutputEvalConfig | None = None,
                      *, generations: Mapping | None = None, seed: int = 0, pool: Sequence | None = None,
                      clamp_latent: bool = False, progress: bool = False) -> dict:
    """{feature: Score} of the output evaluation (module docstring) for every described feature.

    generations: from `output_generations` (e.g. cached by the evaluate job); None: generated here for
    the described features and `pool`, with the model and dic_or_vectors (see `output_generations`; with
    generations given, the model and vectors are not used). pool: the features whose sets may serve as
    distractors (default: every feature of the generations).
    Score: {"method": "output", "value": fraction of judged trials correct | None, "judge", "n": judged
    trials, "failed": failed or malformed judge answers, "seed", "seconds", "tokens_in", "tokens_out",
    "metrics": {"chance", "correct", "group", "failed_calls", "malformed", "unreached": [targets],
    "no_distractors": [groups], "trials": {group: {"correct", "shown", "picked", "margin" | "p_correct",
    "error"?}}}}.
    """
    cfg = _validate_output_cfg(cfg or OutputEvalConfig())
    descriptions = _check_descriptions(descriptions)
    _check_judge(judge)
    features = list(descriptions)
    gen_seconds = 0.0
    if generations is None:
        if model is None:
            raise OutputEvalError("output_evaluation needs the model and vectors, or generations=")
        todo = list(dict.fromkeys(features + [feature_key(f) for f in (pool or [])]))
        generations = output_generations(model, dic_or_vectors, hook, todo, cfg, clamp_latent=clamp_latent,
                                         seed=seed, progress=progress)
        gen_seconds = generations.seconds / max(len(todo), 1)
    gens = normalize_generations(generations)
    missing = [f for f in features if f not in gens]
    if missing:
        raise OutputEvalError(f"the generations lack features {missing[:5]}: regenerate with "
                              "output_generations(..., features=...) including every described feature")
    targets = [float(t) for t in cfg.targets]
    trials, skipped = output_trials(gens, features, group=cfg.group, n_sets=cfg.n_sets, seed=seed, pool=pool)
    t0 = time.perf_counter()
    verdicts = judge_output_trials(trials, descriptions, gens, judge, cfg, seed=seed)
    judge_seconds = time.perf_counter() - t0
    per_feature: dict = {f: [] for f in features}
    for tr, v in zip(trials, verdicts):
        per_feature[tr.feature].append((tr, v))
    scores = {}
    for f in features:
        done = per_feature[f]
        ok = [v["correct"] for _, v in done if v["correct"] is not None]
        trials_m = {}
        for tr, v in done:
            rec = {"correct": v["correct"], "shown": list(tr.shown), "picked": v["picked"]}
            for k in ("margin", "p_correct", "error"):
                if v.get(k) is not None:
                    rec[k] = v[k]
            trials_m[_gname(tr.group)] = rec
        unreached = [t for t in targets if not gens[f].get(t)]
        share = judge_seconds / max(len(trials), 1) * len(done) if getattr(judge, "kind", "") == "embedding" else \
            sum(v.get("seconds", 0.0) for _, v in done)
        scores[f] = {
            "method": OUTPUT_METHOD,
            "value": (sum(ok) / len(ok)) if ok else None,
            "judge": judge.name, "n": len(ok), "failed": len(done) - len(ok), "seed": int(seed),
            "metrics": {"chance": 1.0 / cfg.n_sets, "correct": int(sum(ok)), "group": cfg.group,
                        "failed_calls": sum(bool(v.get("failed_call")) for _, v in done),
                        "malformed": sum(bool(v.get("malformed")) for _, v in done),
                        "unreached": unreached, "no_distractors": sorted(skipped.get(f, {})), "trials": trials_m},
            "seconds": gen_seconds + share,
            "tokens_in": sum(v.get("tokens_in", 0) for _, v in done),
            "tokens_out": sum(v.get("tokens_out", 0) for _, v in done),
        }
    return scores


def output_summary(scores: Mapping, *, seed: int = 0) -> dict:
    """Over features: the mean success rate with a bootstrap 95% CI over features, chance, how many
    features were scored, and which features could not reach a target (reported, not scored as failures)."""
    vals = [s["value"] for s in scores.values() if s["value"] is not None]
    unreached = {f: s["metrics"]["unreached"] for f, s in scores.items() if s["metrics"].get("unreached")}
    return {
        "rate": float(np.mean(vals)) if vals else None,
        "ci": _bootstrap(vals, seed),
        "chance": next(iter(scores.values()))["metrics"]["chance"] if scores else None,
        "n_features": len(scores), "n_scored": len(vals),
        "unscored": [f for f, s in scores.items() if s["value"] is None],
        "failed": int(sum(s.get("failed", 0) for s in scores.values())),
        "unreached": {"count": len(unreached), "features": unreached},
    }


# ---------------------------------------------------------------------------------------------
# Steering vectors of a Dictionary or an array
# ---------------------------------------------------------------------------------------------
def steering_rows(model, dic_or_vectors, hook, features, *, clamp_latent: bool = False):
    """(hook, vectors [len(features), D], code_fn, features_G) to steer `features`.

    A Dictionary: `steering.steering_setup` (its decoder rows at the hook it writes; clamp_latent for SAEs:
    set the latent to α keeping the reconstruction error; otherwise add α · unit row). An array [F, D]
    (row = feature id) with `hook`: add α · unit row."""
    from featureatlas.eval import steering
    from featureatlas.eval.adapters import feature_ids, write_hook

    if hasattr(dic_or_vectors, "directions_FxD"):
        dic = dic_or_vectors
        if hook is not None and hook not in (dic.hook, write_hook(dic)):
            raise OutputEvalError(f"hook {hook!r} is not where the dictionary steers ({write_hook(dic)}); pass "
                                  "hook=None to use the dictionary's own")
        f = feature_ids([int(x) for x in features], dic.n_features)
        h, V, code_fn, feats = steering.steering_setup(dic, f, clamp_latent=clamp_latent)
        return h, steering.check_hook_vectors(model, h, V), code_fn, feats
    if clamp_latent:
        raise OutputEvalError("clamp_latent needs the Dictionary (its encoder gives the latent's value), not an "
                              "array of vectors")
    if hook is None:
        raise OutputEvalError("steering vectors given as an array need hook= (where to add them)")
    V_all = np.asarray(dic_or_vectors, np.float32)
    if V_all.ndim != 2:
        raise OutputEvalError(f"steering vectors must be [n_features, d], got shape {V_all.shape}")
    bad = [x for x in features if not isinstance(x, (int, np.integer)) or not 0 <= int(x) < V_all.shape[0]]
    if bad:
        raise OutputEvalError(f"features {bad[:5]} are not row indices of the {V_all.shape[0]} steering vectors")
    V = V_all[np.asarray(features, np.int64)]
    n = np.linalg.norm(V, axis=1, keepdims=True)
    V = np.where(n > 0, V / np.where(n > 0, n, 1), 0).astype(np.float32)
    return hook, steering.check_hook_vectors(model, hook, V), None, None


def _code_kw(code_fn, feats, rows) -> dict:
    """kl_calibrate / steered_generations keywords of the latent clamp for the given rows (empty: add)."""
    if code_fn is None:
        return {}
    return {"code_fn": code_fn, "features_G": np.asarray(feats, np.int32)[np.asarray(rows, np.int64)]}


# ---------------------------------------------------------------------------------------------
# Output evaluation: generation step
# ---------------------------------------------------------------------------------------------
class Generations(dict):
    """A plain dict of generations; `.calibration` holds the strength search's record per feature and target
    ({"alpha", "kl", "reached", "status"}) and `.seconds` the wall time (neither survives JSON: store them
    beside the generations if wanted)."""

    calibration: dict
    seconds: float


def output_generations(model, dic_or_vectors, hook, features: Sequence, cfg: OutputEvalConfig | None = None, *,
                       clamp_latent: bool = False, seed: int = 0, progress: bool = False) -> Generations:
    """{feature: {signed target: [texts]}} of the output evaluation's steering (module docstring, steps 1-2).

    dic_or_vectors: a Dictionary (hook None: where it writes) or an array [F, D] of directions at `hook`
    (row = feature id). clamp_latent: SAEs, clamp the latent keeping the error term (the paper); else add
    α · unit direction. Every configured target is a key of each feature; its list is [] when the
    target was not reached. Texts per target: prompts × n_samples, prompt-major, continuations only.
    """
    from featureatlas.activation_store.models import Sampling
    from featureatlas.eval import steering

    cfg = _validate_output_cfg(cfg or OutputEvalConfig())
    features = list(dict.fromkeys(feature_key(f) for f in features))
    hook, V, code_fn, feats = steering_rows(model, dic_or_vectors, hook, features, clamp_latent=clamp_latent)
    t0 = time.perf_counter()
    targets = [float(t) for t in cfg.targets]
    rows = [(i, t) for i in range(len(features)) for t in targets]
    ri = [i for i, _ in rows]
    cal = steering.kl_calibrate(model, hook, V[ri], np.array([t for _, t in rows], np.float32), list(cfg.prompts),
                                positions=cfg.positions, lo=cfg.lo, hi=cfg.hi, iters=cfg.iters, band=cfg.band,
                                batch=cfg.batch, progress=progress, **_code_kw(code_fn, feats, ri))
    reached = np.asarray(cal.reached_G, bool)
    alphas = np.asarray(cal.alpha_G, np.float32)
    idx = np.flatnonzero(reached)
    texts = []
    if len(idx):
        gi = [ri[g] for g in idx]
        texts = steering.steered_generations(
            model, hook, V[gi], alphas[idx], list(cfg.prompts), n_new=cfg.n_new,
            sampling=Sampling(temperature=cfg.temperature), n_samples=cfg.n_samples, seed=seed,
            **_code_kw(code_fn, feats, gi))
    out = Generations({f: {t: [] for t in targets} for f in features})
    out.calibration = {f: {} for f in features}
    for g, (i, t) in enumerate(rows):
        out.calibration[features[i]][t] = cal.record(g)
    for k, g in enumerate(idx):
        i, t = rows[g]
        out[features[i]][t] = [str(x) for x in texts[k]]
    out.seconds = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------
# Steering evaluation (Shafran et al. 2025)
# ---------------------------------------------------------------------------------------------
def _sampling(cfg: SteeringEvalConfig):
    from featureatlas.activation_store.models import Sampling

    return Sampling(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=None if cfg.top_p >= 1 else cfg.top_p)


def steering_generations(model, dic_or_vectors, hook, features: Sequence, cfg: SteeringEvalConfig | None = None, *,
                         corpus_tokens=None, clamp_latent: bool = False, seed: int = 0, progress: bool = False) -> dict:
    """Everything the steering evaluation needs from the model, for every feature (no description, no judge):

        {"prompt": str,
         "baseline": {"texts": [unsteered texts], "ppl": [their perplexities]},
         "features": {feature: {signed target: {"alpha", "kl", "reached", "status",
                                                "texts": [...], "ppl": [...], "nll_increase": float | None}}},
         "seconds": wall time}

    Texts and ppl are [] for unreached strengths. ppl: the unsteered model's perplexity of each continuation
    given the prompt (`steering.perplexity`, the offline fluency judge's input). nll_increase: mean per-token
    NLL increase on `corpus_tokens` ([B, T] held-out sequences, BOS first; e.g. `outputs.corpus_sequences`)
    under that strength (`steering.capability_cost`); None when no corpus tokens are given or cfg.capability
    is off. The unsteered texts are drawn with seed + 1 (an independent sample; they depend on the model,
    the config and the seed only).
    """
    from featureatlas.eval import steering

    cfg = (cfg or SteeringEvalConfig()).validate()
    features = list(dict.fromkeys(feature_key(f) for f in features))
    hook, V, code_fn, feats = steering_rows(model, dic_or_vectors, hook, features, clamp_latent=clamp_latent)
    if corpus_tokens is not None:
        corpus_tokens = np.asarray(corpus_tokens)
        if corpus_tokens.ndim != 2 or corpus_tokens.shape[1] < 3:
            raise OutputEvalError(f"corpus_tokens must be [n_seq, seq_len >= 3] token ids, got {corpus_tokens.shape}")
    t0 = time.perf_counter()
    prompts = [cfg.prompt]
    signed = [float(s * t) for s in cfg.signs for t in cfg.targets]
    rows = [(i, t) for i in range(len(features)) for t in signed]
    ri = [i for i, _ in rows]
    cal = steering.kl_calibrate(model, hook, V[ri], np.array([t for _, t in rows], np.float32), prompts,
                                positions=cfg.positions, lo=cfg.lo, hi=cfg.hi, iters=cfg.iters, band=cfg.band,
                                batch=cfg.batch, progress=progress, **_code_kw(code_fn, feats, ri))
    reached = np.asarray(cal.reached_G, bool)
    alphas = np.asarray(cal.alpha_G, np.float32)
    idx = np.flatnonzero(reached)
    gi = [ri[g] for g in idx]
    sampling = _sampling(cfg)
    texts = []
    if len(idx):
        texts = steering.steered_generations(model, hook, V[gi], alphas[idx], prompts, n_new=cfg.n_new,
                                             sampling=sampling, n_samples=cfg.n_samples, seed=seed,
                                             **_code_kw(code_fn, feats, gi))
    baseline = steering.unsteered_generations(model, prompts, n_new=cfg.n_new, sampling=sampling,
                                              n_samples=cfg.n_baseline, seed=seed + 1)
    flat = [t for ts in texts for t in ts] + list(baseline)
    ppl = steering.perplexity(model, flat, prefixes=[cfg.prompt] * len(flat)) if flat else np.zeros(0)
    nll = None
    if cfg.capability and corpus_tokens is not None and len(idx):
        nll = steering.capability_cost(model, hook, V[gi], alphas[idx], corpus_tokens, **_code_kw(code_fn, feats, gi))
    out = {f: {} for f in features}
    for g, (i, t) in enumerate(rows):
        rec = cal.record(g)
        out[features[i]][t] = {"alpha": rec["alpha"], "kl": rec["kl"], "reached": rec["reached"],
                               "status": rec["status"], "texts": [], "ppl": [], "nll_increase": None}
    pos = 0
    for k, g in enumerate(idx):
        i, t = rows[g]
        n = len(texts[k])
        cell = out[features[i]][t]
        cell["texts"] = [str(x) for x in texts[k]]
        cell["ppl"] = [_finite(x) for x in ppl[pos:pos + n]]
        cell["nll_increase"] = None if nll is None else float(nll[k])
        pos += n
    return {"prompt": cfg.prompt,
            "baseline": {"texts": [str(x) for x in baseline], "ppl": [_finite(x) for x in ppl[pos:]]},
            "features": out, "seconds": time.perf_counter() - t0}


def _finite(x) -> float | None:
    """JSON has no NaN: a perplexity that is not finite (an empty text) is None."""
    x = float(x)
    return x if math.isfinite(x) else None


def concept_prompt(description: str, prompt: str, text: str) -> str:
    """The LLM judge's concept question (0-2) for one steered text."""
    return "\n".join([
        f'A feature of a language model is described as: "{_one_line(description)}"',
        "",
        "While the feature was amplified, the model continued a prompt as follows:",
        f'"{_one_line(prompt + text)}"',
        "",
        "How clearly does the text express the concept of the feature description?",
        "0 = not at all, 1 = somewhat, 2 = clearly.",
        "Answer with the number only: 0, 1 or 2.",
    ])


def fluency_prompt(prompt: str, text: str) -> str:
    """The LLM judge's fluency question (0-2) for one text (no description: shared by every description)."""
    return "\n".join([
        "A language model continued a prompt as follows:",
        f'"{_one_line(prompt + text)}"',
        "",
        "How fluent is the text: grammatical, coherent and not repetitive?",
        "0 = not fluent, 1 = somewhat fluent, 2 = fluent.",
        "Answer with the number only: 0, 1 or 2.",
    ])


def normalize_steering_generations(generations: Mapping) -> dict:
    """`steering_generations`' dict with int feature keys and float target keys (after a JSON round trip)."""
    if not isinstance(generations, Mapping) or not {"prompt", "baseline", "features"} <= set(generations):
        raise OutputEvalError("generations must be the dict that steering_generations returns (prompt, baseline, "
                              "features)")
    feats = {}
    for f, per in generations["features"].items():
        if not isinstance(per, Mapping):
            raise OutputEvalError(f"steering generations of feature {f!r} must map targets to records")
        feats[feature_key(f)] = {target_key(t): rec for t, rec in per.items()}
    return {**generations, "features": feats}


def _rate_llm(judge, descriptions, gens, cfg, seed) -> dict:
    """{(feature, target): [(concept, fluency) per text, None when failed]} and the tally of the calls."""
    from featureatlas.eval.judges import Tally

    prompt = gens["prompt"]
    keys, cprompts, fprompts = [], [], []
    for f in descriptions:
        for t, rec in gens["features"][f].items():
            for k, text in enumerate(rec.get("texts") or []):
                keys.append((f, t, k))
                cprompts.append(concept_prompt(descriptions[f], prompt, text))
                fprompts.append(fluency_prompt(prompt, text))
    answers = judge.ask(cprompts + fprompts, max_tokens=cfg.judge_max_tokens, temperature=0.0, logprobs=True,
                        seed=seed) if keys else []
    n = len(keys)
    out: dict = {}
    tallies: dict = {}
    opts = ["0", "1", "2"]
    for j, (f, t, k) in enumerate(keys):
        tally = tallies.setdefault(f, Tally())
        c, _ = answer_choice(answers[j], opts, tally)
        fl, _ = answer_choice(answers[n + j], opts, tally)
        out.setdefault((f, t), []).append(None if c is None or fl is None else (int(c), int(fl)))
    return out, tallies


def _rate_offline(judge, descriptions, gens, cfg) -> dict:
    """{(feature, target): [(concept, fluency) per text]} by the calibrated embedding/perplexity rules."""
    base = gens["baseline"]
    base_texts = list(base["texts"])
    base_ppl = np.asarray([np.nan if p is None else p for p in base["ppl"]], float)
    base_ppl = base_ppl[np.isfinite(base_ppl)]
    if len(base_texts) < 4 or len(base_ppl) < 4:
        raise OutputEvalError(f"the offline steering judge needs at least 4 unsteered texts with a perplexity, "
                              f"got {len(base_ppl)}: regenerate with a larger --n-baseline")
    texts = sorted({t for f in descriptions for rec in gens["features"][f].values() for t in rec.get("texts") or []}
                   | set(base_texts))
    descs = sorted(set(descriptions.values()))
    E_t = np.asarray(judge.embed(texts), np.float32) if texts else np.zeros((0, 1), np.float32)
    E_d = np.asarray(judge.embed(descs), np.float32)
    trow = {t: i for i, t in enumerate(texts)}
    S = E_d @ E_t.T  # [descriptions, texts] cosine (unit embeddings)
    drow = {d: i for i, d in enumerate(descs)}
    base_cols = [trow[t] for t in base_texts]
    out = {}
    for f, desc in descriptions.items():
        d = drow[desc]
        base_sims = S[d, base_cols]
        for t, rec in gens["features"][f].items():
            rated = []
            for text, p in zip(rec.get("texts") or [], rec.get("ppl") or []):
                c = concept_level(float(S[d, trow[text]]), base_sims, hi=cfg.concept_hi, mid=cfg.concept_mid)
                fl = fluency_level(np.nan if p is None else float(p), base_ppl, q=cfg.fluency_q,
                                   factor=cfg.fluency_factor)
                rated.append((c, fl))
            if rated:
                out[(f, t)] = rated
    return out


def steering_evaluation(model, dic_or_vectors, hook, descriptions: Mapping, judge,
                        cfg: SteeringEvalConfig | None = None, *, generations: Mapping | None = None,
                        corpus_tokens=None, clamp_latent: bool = False, seed: int = 0,
                        progress: bool = False) -> dict:
    """{feature: Score} of the SNMF paper's steering evaluation (module docstring) for every described feature.

    generations: from `steering_generations` (cached by the evaluate job); None: generated here (needs the
    model, the vectors and, for the capability cost, corpus_tokens). The judge: an LLMJudge (concept and
    fluency prompts) or the EmbeddingJudge (offline rules; the perplexities come with the generations).
    Score: {"method": "steering", "value": max over reached strengths of the mean score | None, "judge",
    "n": judged texts, "failed": texts whose concept or fluency answer failed or was malformed, "seed",
    "seconds", "tokens_in", "tokens_out", "metrics": {"best": target key, "unreached": [targets],
    "strengths": {"+0.025": {"alpha", "kl", "reached", "status", "concept", "fluency", "score", "n",
    "failed", "nll_increase"}, ...}}}; concept, fluency and score are means over the strength's judged texts.
    """
    cfg = (cfg or SteeringEvalConfig()).validate()
    descriptions = _check_descriptions(descriptions)
    kind = _check_judge(judge)
    gen_seconds = 0.0
    if generations is None:
        if model is None:
            raise OutputEvalError("steering_evaluation needs the model and vectors, or generations=")
        generations = steering_generations(model, dic_or_vectors, hook, list(descriptions), cfg,
                                           corpus_tokens=corpus_tokens, clamp_latent=clamp_latent, seed=seed,
                                           progress=progress)
        gen_seconds = generations["seconds"] / max(len(descriptions), 1)
    gens = normalize_steering_generations(generations)
    missing = [f for f in descriptions if f not in gens["features"]]
    if missing:
        raise OutputEvalError(f"the steering generations lack features {missing[:5]}: regenerate with "
                              "steering_generations(..., features=...) including every described feature")
    t0 = time.perf_counter()
    tallies: dict = {}
    if kind == "llm":
        ratings, tallies = _rate_llm(judge, descriptions, gens, cfg, seed)
    else:
        ratings = _rate_offline(judge, descriptions, gens, cfg)
    judge_seconds = time.perf_counter() - t0
    n_texts = sum(len(v) for v in ratings.values()) or 1
    scores = {}
    for f in descriptions:
        strengths, best, n_ok, n_failed, texts_f = {}, None, 0, 0, 0
        for t in sorted(gens["features"][f], key=lambda x: (x < 0, abs(x))):
            rec = gens["features"][f][t]
            cell = {k: rec.get(k) for k in ("alpha", "kl", "reached", "status", "nll_increase")}
            rated = ratings.get((f, t), [])
            texts_f += len(rated)
            ok = [r for r in rated if r is not None]
            n_ok += len(ok)
            n_failed += len(rated) - len(ok)
            cell.update(n=len(ok), failed=len(rated) - len(ok))
            if ok:
                cell["concept"] = float(np.mean([c for c, _ in ok]))
                cell["fluency"] = float(np.mean([fl for _, fl in ok]))
                cell["score"] = float(np.mean([harmonic_score(c, fl) for c, fl in ok]))
                if best is None or cell["score"] > strengths[best]["score"]:
                    best = _gname(t)
            strengths[_gname(t)] = cell
        tally = tallies.get(f)
        share = (judge_seconds * texts_f / n_texts) if tally is None else tally.seconds
        metrics = {"best": best, "unreached": [t for t, r in gens["features"][f].items() if not r.get("reached")],
                   "strengths": strengths}
        if tally is not None:
            metrics.update(failed_calls=tally.failed, malformed=tally.malformed)
        scores[f] = {
            "method": STEERING_METHOD, "value": None if best is None else strengths[best]["score"],
            "judge": judge.name, "n": n_ok, "failed": n_failed, "seed": int(seed), "metrics": metrics,
            "seconds": gen_seconds + share,
            "tokens_in": 0 if tally is None else tally.tokens_in,
            "tokens_out": 0 if tally is None else tally.tokens_out,
        }
    return scores


def steering_summary(scores: Mapping, *, seed: int = 0) -> dict:
    """Over features: mean steering score (max over strengths per feature) with a bootstrap 95% CI, mean
    concept / fluency / NLL increase at each strength over the features that reached it, and the features
    that could not reach some strength."""
    vals = [s["value"] for s in scores.values() if s["value"] is not None]
    per: dict = {}
    for s in scores.values():
        for k, cell in s["metrics"]["strengths"].items():
            p = per.setdefault(k, {"reached": 0, "concept": [], "fluency": [], "score": [], "nll_increase": []})
            p["reached"] += bool(cell.get("reached"))
            for m in ("concept", "fluency", "score", "nll_increase"):
                if cell.get(m) is not None:
                    p[m].append(cell[m])
    by_strength = {k: {"reached": p["reached"], **{m: (float(np.mean(p[m])) if p[m] else None)
                                                   for m in ("concept", "fluency", "score", "nll_increase")}}
                   for k, p in per.items()}
    unreached = {f: s["metrics"]["unreached"] for f, s in scores.items() if s["metrics"].get("unreached")}
    return {"score": float(np.mean(vals)) if vals else None, "ci": _bootstrap(vals, seed),
            "n_features": len(scores), "n_scored": len(vals),
            "unscored": [f for f, s in scores.items() if s["value"] is None],
            "failed": int(sum(s.get("failed", 0) for s in scores.values())),
            "by_strength": by_strength, "unreached": {"count": len(unreached), "features": unreached}}
