"""Prompt builders for the LLM explainers, and the parser of their answers.

One builder per description method; each turns a feature record (features.jsonl schema, see
`featureatlas.eval.schema`) into chat messages: a system turn that explains the evidence format, one
worked example (a user turn with hand-made evidence and the assistant's answer), then the feature's
own evidence. The answer is one sentence after the fixed marker `Description:`.

- `maxact` (input-centric; OpenAI neuron explainer / delphi style): the top activating windows, tokens
  whose activation is >= `highlight` x max marked `<<tok>>` (consecutive marked tokens share one pair),
  then an `Activations:` line of (token, a) pairs with a = floor(10 * relu(act) / max) in 0..10 (max over
  the windows shown), listing only tokens with a >= 1.
- `vocabproj` (output-centric, Gur-Arieh et al. 2025): the top and bottom tokens of W_U . final_norm(d).
- `tokenchange`: the tokens made more / less likely when the feature is clamped to +c and to -c.
- `ensemble-raw`: one prompt with the input evidence (MaxAct) and the output evidence (VocabProj and
  TokenChange, whichever the record has).
- `ensemble-concat` has no prompt: it joins the separate descriptions (`concat_descriptions`).

Every string that came from the corpus or a model is data: tokens are shown JSON-quoted in lists and
with control characters escaped inline, so a token cannot break the prompt's layout.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from featureatlas.activation_store.configs import Config, setting

MARKER = "Description:"
"""The fixed marker after which the explainer writes its answer."""

PROMPT_VERSIONS = {
    "maxact": "maxact-v1",
    "vocabproj": "vocabproj-v1",
    "tokenchange": "tokenchange-v1",
    "ensemble-raw": "ensemble-raw-v1",
    "ensemble-concat": "ensemble-concat-v1",
}
"""Description method -> the prompt version recorded as a description's `prompt_method`."""

METHODS = tuple(PROMPT_VERSIONS)
PROMPTED_METHODS = ("maxact", "vocabproj", "tokenchange", "ensemble-raw")
CONCAT_PARTS = ("maxact", "vocabproj", "tokenchange")
"""The descriptions `ensemble-concat` joins, in this order (those that exist)."""


class MissingEvidence(ValueError):
    """The record lacks the evidence a method needs (e.g. no `vocab_proj`); the description fails."""


@dataclass
class PromptConfig(Config):
    """What the prompts show of a feature's evidence."""

    n_examples: int = setting(10, ge=1)
    """MaxAct: top-activating example windows shown to the explainer."""
    n_quantile: int = setting(0, ge=0)
    """MaxAct: extra example windows taken from each activation-quantile bin (highest bin first; 0 = top only)."""
    highlight: float = setting(0.3, gt=0.0, le=1.0)
    """MaxAct: tokens with activation >= this fraction of the max are marked <<tok>>."""
    n_vocab: int = setting(50, ge=1)
    """VocabProj: tokens shown from each end of the projection (top and bottom)."""
    n_change: int = setting(10, ge=1)
    """TokenChange: tokens shown in each list (up and down, for each sign of the clamp)."""
    max_chars: int = setting(200, ge=20)
    """A parsed description longer than this is cut at a word boundary."""


# ---------------------------------------------------------------------------------------------
# Token and activation formatting
# ---------------------------------------------------------------------------------------------
def show_token(tok: str) -> str:
    """A token as a JSON string literal: `" Paris"`, `"\\n"` (leading spaces visible, controls escaped)."""
    return json.dumps(str(tok), ensure_ascii=False)


def inline_token(tok: str) -> str:
    """A token for running text: newline, carriage return and tab written as \\n, \\r, \\t."""
    return str(tok).replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def token_list(pairs: Sequence, n: int) -> str:
    """The first n tokens of [[tok, value], ...] as `" a", " b", ...`."""
    return ", ".join(show_token(p[0]) for p in list(pairs)[:n])


def normalise_acts(acts: Sequence[float], max_act: float) -> list[int]:
    """a_i = floor(10 * relu(act_i) / max_act), clipped to 0..10 (all 0 when max_act <= 0)."""
    if not max_act or max_act <= 0 or not math.isfinite(max_act):
        return [0] * len(acts)
    return [min(10, max(0, math.floor(10.0 * max(float(a), 0.0) / max_act + 1e-9))) for a in acts]


def highlight_window(tokens: Sequence[str], acts: Sequence[float], max_act: float, frac: float) -> str:
    """The window's text with tokens whose activation >= frac * max_act (and > 0) marked `<<...>>`;
    consecutive marked tokens share one pair of marks."""
    out, inside = [], False
    for tok, a in zip(tokens, acts):
        hot = max_act > 0 and float(a) > 0 and float(a) >= frac * max_act
        if hot and not inside:
            out.append("<<")
        elif not hot and inside:
            out.append(">>")
        inside = hot
        out.append(inline_token(tok))
    if inside:
        out.append(">>")
    return "".join(out)


def activation_list(tokens: Sequence[str], acts: Sequence[float], max_act: float) -> str:
    """`(" Paris", 10), (" week", 2)`: every token whose normalised activation is >= 1, in window order."""
    pairs = [f"({show_token(t)}, {a})" for t, a in zip(tokens, normalise_acts(acts, max_act)) if a >= 1]
    return ", ".join(pairs) if pairs else "none"


# ---------------------------------------------------------------------------------------------
# Evidence blocks
# ---------------------------------------------------------------------------------------------
def select_examples(record: Mapping[str, Any], cfg: PromptConfig) -> list[Mapping[str, Any]]:
    """Top n_examples windows, then n_quantile from each quantile bin (highest bin first); explain split only
    (the cache never puts held-out windows in `examples`)."""
    ex = record.get("examples") or {}
    chosen = list(ex.get("top") or [])[: cfg.n_examples]
    if cfg.n_quantile:
        for bin_ in reversed(list(ex.get("quantiles") or [])):
            chosen.extend(list(bin_)[: cfg.n_quantile])
    return [e for e in chosen if e.get("tokens")]


def maxact_evidence(record: Mapping[str, Any], cfg: PromptConfig) -> tuple[str, dict]:
    """(text block, evidence provenance) for the MaxAct windows; MissingEvidence when none fires."""
    examples = select_examples(record, cfg)
    max_act = max((float(a) for e in examples for a in e["acts"]), default=0.0)
    if not examples or max_act <= 0:
        raise MissingEvidence("the record has no activating example windows (examples.top is empty)")
    lines = []
    for i, e in enumerate(examples, 1):
        lines.append(f"Example {i}: {highlight_window(e['tokens'], e['acts'], max_act, cfg.highlight)}")
        lines.append(f"Activations: {activation_list(e['tokens'], e['acts'], max_act)}")
    return "\n".join(lines), {"n_examples": len(examples), "split": "explain"}


def vocabproj_evidence(record: Mapping[str, Any], cfg: PromptConfig) -> tuple[str, dict]:
    vp = record.get("vocab_proj") or {}
    top, bottom = list(vp.get("top") or [])[: cfg.n_vocab], list(vp.get("bottom") or [])[: cfg.n_vocab]
    if not top:
        raise MissingEvidence("the record has no VocabProj tokens (vocab_proj.top is empty)")
    lines = [f"Tokens the feature promotes most: {token_list(top, cfg.n_vocab)}"]
    if bottom:
        lines.append(f"Tokens the feature suppresses most: {token_list(bottom, cfg.n_vocab)}")
    return "\n".join(lines), {"n_tokens": len(top) + len(bottom)}


def _clamp_text(c: float) -> str:
    return f"{c:g}"


def tokenchange_evidence(record: Mapping[str, Any], cfg: PromptConfig) -> tuple[str, dict]:
    tc = record.get("token_change") or {}
    c = float(tc.get("clamp", 0.0) or 0.0)
    lines, n = [], 0
    for sign, value in (("pos", c), ("neg", -c)):
        part = tc.get(sign) or {}
        up, down = list(part.get("up") or [])[: cfg.n_change], list(part.get("down") or [])[: cfg.n_change]
        if not up and not down:
            continue
        lines.append(f"With the feature set to {_clamp_text(value)} at every position:")
        lines.append(f"  more likely next tokens: {token_list(up, cfg.n_change) or 'none'}")
        lines.append(f"  less likely next tokens: {token_list(down, cfg.n_change) or 'none'}")
        n += len(up) + len(down)
    if not n:
        raise MissingEvidence("the record has no TokenChange tokens (token_change is empty)")
    return "\n".join(lines), {"n_tokens": n, "clamp": c}


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
_INTRO = "You are studying the features of a neural language model. "
_ANSWER = f'Answer with one short sentence after "{MARKER}".'

SYSTEM = {
    "maxact": _INTRO + (
        "Each feature gives every token of a text an activation. You will see text excerpts where one feature "
        "fires. Tokens where it fires strongly are marked <<like this>>. After each excerpt, the Activations line "
        "lists the tokens where it fires, each with its activation from 0 to 10 (10 = strongest). Work out what "
        "the marked tokens and their contexts have in common. " + _ANSWER),
    "vocabproj": _INTRO + (
        "Each feature writes a direction into the model's hidden state. Projecting that direction onto the "
        "vocabulary shows which next tokens the feature promotes and which it suppresses. Work out what the "
        "promoted tokens have in common. " + _ANSWER),
    "tokenchange": _INTRO + (
        "Setting a feature to a large positive or negative value at every position changes which next tokens "
        "the model predicts. You will see the tokens that became more and less likely for each sign. Work out "
        "what the feature makes the model say. " + _ANSWER),
    "ensemble-raw": _INTRO + (
        "You will see two kinds of evidence about one feature. Input: text excerpts where the feature fires, "
        "strongly firing tokens marked <<like this>>, and an Activations line of (token, activation 0 to 10) "
        "pairs. Output: the next tokens the feature promotes or suppresses, and those that become more or less "
        "likely when the feature is set to a large value. Describe what makes the feature fire and what it does. "
        + _ANSWER),
}

QUESTION = {
    "maxact": "What does this feature fire on?",
    "vocabproj": "What does this feature promote?",
    "tokenchange": "What does this feature make the model say?",
    "ensemble-raw": "What does this feature fire on, and what does it do?",
}


def _example_window(text_tokens: list[str], acts: list[float], ctx: int) -> dict:
    return {"context": ctx, "start": 0, "tokens": text_tokens, "acts": acts,
            "max_pos": max(range(len(acts)), key=lambda i: acts[i])}


WORKED_RECORD: dict = {
    "examples": {"top": [
        _example_window(["I", " flew", " to", " Paris", " last", " week", "."], [0, 0, 0.4, 8.0, 0.9, 0, 0], 0),
        _example_window(["The", " train", " from", " Lyon", " was", " late", "."], [0, 0.2, 0, 6.5, 1.1, 0, 0], 1),
    ]},
    "vocab_proj": {"top": [[" France", 3.1], [" French", 2.9], [" Paris", 2.5], [" Lyon", 2.2], [" Marseille", 2.0]],
                   "bottom": [[" Germany", -2.4], [" German", -2.2], [" Berlin", -2.0], [" Spain", -1.8],
                              [" Madrid", -1.7]]},
    "token_change": {"clamp": 10.0,
                     "pos": {"up": [[" France", 1.9], [" French", 1.5], [" Paris", 1.2]],
                             "down": [[" Germany", -0.9], [" German", -0.8], [" Berlin", -0.6]]},
                     "neg": {"up": [[" Germany", 0.7], [" Spain", 0.6], [" Italy", 0.5]],
                             "down": [[" France", -1.4], [" French", -1.1], [" Paris", -0.9]]}},
}
"""The hand-made feature of every prompt's worked example: French cities, promoting France-related tokens."""

WORKED_ANSWER = {
    "maxact": 'names of French cities such as "Paris" and "Lyon".',
    "vocabproj": "France and things French: the country, its language and its cities.",
    "tokenchange": "makes the model talk about France and not about Germany.",
    "ensemble-raw": "names of French cities; when active it makes the model predict words about France.",
}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def copies_worked_example(text: str) -> bool:
    """True when a description is (nearly) a worked example's answer: a small explainer that parrots the
    example says nothing about the feature, so the answer counts as failed. Test: ≥ 70% of the answer's
    words occur in one worked answer and it keeps one of the example's own names (France, Germany, ...)."""
    words = _words(text)
    if not words or not words & {"france", "french", "paris", "lyon", "marseille", "germany"}:
        return False
    return any(len(words & _words(a)) >= 0.7 * len(words) for a in WORKED_ANSWER.values())


def evidence_block(record: Mapping[str, Any], method: str, cfg: PromptConfig) -> tuple[str, dict]:
    """(evidence text, provenance dict) for a prompted method; MissingEvidence when the record lacks it."""
    if method == "maxact":
        return maxact_evidence(record, cfg)
    if method == "vocabproj":
        return vocabproj_evidence(record, cfg)
    if method == "tokenchange":
        return tokenchange_evidence(record, cfg)
    if method == "ensemble-raw":
        inp, inp_ev = maxact_evidence(record, cfg)
        outs, out_ev = [], {}
        for name, fn in (("vocabproj", vocabproj_evidence), ("tokenchange", tokenchange_evidence)):
            try:
                text, ev = fn(record, cfg)
            except MissingEvidence:
                continue
            outs.append(text)
            out_ev[name] = ev
        if not outs:
            raise MissingEvidence("ensemble-raw needs output evidence (vocab_proj or token_change) besides examples")
        return (f"Input evidence:\n{inp}\n\nOutput evidence:\n" + "\n".join(outs),
                {**inp_ev, "split": "explain", **out_ev})
    raise ValueError(f"method {method!r} has no prompt; prompted methods: {', '.join(PROMPTED_METHODS)}")


def user_turn(evidence: str, method: str) -> str:
    return f"{evidence}\n\n{QUESTION[method]} {_ANSWER}"


def build_prompt(record: Mapping[str, Any], method: str, cfg: PromptConfig | None = None) -> tuple[list[dict], dict]:
    """(chat messages, evidence provenance) for one feature and one prompted method.

    Messages: system (format), user (worked example), assistant ("Description: ..."), user (this feature).
    Raises MissingEvidence when the record lacks what the method needs.
    """
    cfg = cfg or PromptConfig()
    evidence, provenance = evidence_block(record, method, cfg)
    worked, _ = evidence_block(WORKED_RECORD, method, cfg)
    messages = [
        {"role": "system", "content": SYSTEM[method]},
        {"role": "user", "content": user_turn(worked, method)},
        {"role": "assistant", "content": f"{MARKER} {WORKED_ANSWER[method]}"},
        {"role": "user", "content": user_turn(evidence, method)},
    ]
    return messages, provenance


def maxact_prompt(record, cfg=None):
    return build_prompt(record, "maxact", cfg)[0]


def vocabproj_prompt(record, cfg=None):
    return build_prompt(record, "vocabproj", cfg)[0]


def tokenchange_prompt(record, cfg=None):
    return build_prompt(record, "tokenchange", cfg)[0]


def ensemble_raw_prompt(record, cfg=None):
    return build_prompt(record, "ensemble-raw", cfg)[0]


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def concat_descriptions(texts: Mapping[str, str | None]) -> str | None:
    """ensemble-concat: the separate descriptions joined in CONCAT_PARTS order, each ending in a full stop,
    as 'Input: <maxact>. Output: <vocabproj>. <tokenchange>.'; None when there is none."""
    inp = [_sentence(texts[m]) for m in ("maxact",) if texts.get(m)]
    out = [_sentence(texts[m]) for m in ("vocabproj", "tokenchange") if texts.get(m)]
    parts = ([f"Input: {' '.join(inp)}"] if inp else []) + ([f"Output: {' '.join(out)}"] if out else [])
    return " ".join(parts) or None


# ---------------------------------------------------------------------------------------------
# Answer parsing
# ---------------------------------------------------------------------------------------------
_MARKER_RE = re.compile(r"description\s*:", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def parse_description(text: str | None, *, truncated: bool = False, max_chars: int = 200) -> str | None:
    """The description in an explainer's answer, or None (a failed answer).

    The text after the first `Description:` (any case; the whole answer when the marker is absent), its
    first non-empty line, stripped of whitespace, quotes and markdown emphasis, collapsed to single spaces.
    `truncated` (the reply hit max_tokens): a first line that the reply ends in may be cut mid-sentence, so it
    is cut back to its last sentence end, and None when it has none. Longer than max_chars: cut at a word.
    """
    if not text:
        return None
    m = _MARKER_RE.search(text)
    body = text[m.end():] if m else text
    lines = body.split("\n")
    idx = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if idx is None:
        return None
    line = " ".join(lines[idx].split())
    if truncated and idx == len(lines) - 1:
        ends = list(_SENTENCE_END.finditer(line))
        if not ends:
            return None
        line = line[: ends[-1].end()]
    line = line.strip().strip("*_`").strip()
    quotes = '"\u201c\u201d'
    if len(line) >= 2 and line[0] in quotes and line[-1] in quotes and not any(q in line[1:-1] for q in quotes):
        line = line[1:-1].strip()
    if len(line) > max_chars:
        cut = line[:max_chars]
        line = cut[: cut.rfind(" ")] if " " in cut else cut
        line = line.rstrip(" ,;:")
    return line or None


__all__ = [
    "MARKER", "METHODS", "PROMPTED_METHODS", "PROMPT_VERSIONS", "CONCAT_PARTS", "MissingEvidence", "PromptConfig",
    "show_token", "inline_token", "normalise_acts", "highlight_window", "activation_list", "select_examples",
    "evidence_block", "build_prompt", "maxact_prompt", "vocabproj_prompt", "tokenchange_prompt",
    "ensemble_raw_prompt", "concat_descriptions", "parse_description", "WORKED_RECORD",
]
