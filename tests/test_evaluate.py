"""The evaluate job end to end on a tiny random model (tests/evaluate_helper.py): cached reruns make no model or
judge call, a SIGKILLed run resumes to the uninterrupted result, bad descriptions are refused before anything is
written; and the synthetic ground-truth suite on the real SmolLM2 (planted features, true vs shuffled descriptions)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate_helper as H
from featureatlas.activation_store.errors import ConfigError
from featureatlas.eval.embedder import EmbeddingJudge
from featureatlas.eval.schema import validate_record


class CountingJudge(EmbeddingJudge):
    """The real embedding judge, counting the texts it is asked to embed."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        return super().embed(texts)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("ev")
    H.build(w)
    return w


def _values(out: Path) -> dict:
    recs = [json.loads(x) for x in (out / "neurons" / "records.jsonl").read_text().splitlines()]
    return {(r["index"], s["method"], s["judge"]): s["value"] for r in recs for s in r["scores"]}


def test_evaluate_scores_merges_reports_and_a_cached_rerun_calls_nothing(work, tmp_path):
    out = tmp_path / "eval"
    loads = []

    def load():
        loads.append(1)
        return H.tiny_model()

    res = H.run(work, out, load_model=load, evaluations=("cheap", "embedding", "input", "output", "steering",
                                                         "probing"))
    assert res["n_new"] > 0 and loads == [1]
    recs = [json.loads(x) for x in (out / "neurons" / "records.jsonl").read_text().splitlines()]
    for r in recs:
        validate_record(r)
    scored = [r for r in recs if r["scores"]]
    assert sorted(r["index"] for r in scored) == [0, 1, 2, 3, 4, 5]
    methods = {s["method"] for r in scored for s in r["scores"]}
    for m in ("cheap_input", "cheap_output", "embedding:maxact/template", "input:vocabproj/template",
              "output:maxact/template", "steering:vocabproj/template"):
        assert m in methods
    report = json.loads((out / "report.json").read_text())
    assert {r["evaluation"] for r in report["summary"]} >= {"cheap", "embedding", "input", "output", "steering"}
    assert any(p["kind"] == "raw activations" for p in report["probing"])
    for png in ("input_vs_output.png", "steering.png", "distributions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| neurons | neurons | output | maxact/template |" in md
    catalog = json.loads((out / "catalog" / "catalog.json").read_text())
    assert "output:maxact/template" in catalog.get("score_methods", []) or (out / "catalog" / "index.html").exists()
    # the rerun: every result comes from the cache, no model load, no judge call
    judge = CountingJudge()
    again = H.run(work, out, resume=True, load_model=load, judges={"embedding": judge},
                  evaluations=("cheap", "embedding", "input", "output", "steering", "probing"))
    assert again["n_new"] == 0 and again["blocks_run"] == 0 and not again["model_loaded"]
    assert loads == [1] and judge.calls == 0
    # a judge-only setting changed: the cached generations are judged again, without the model
    import dataclasses

    prot = H.protocols()
    prot["output"] = dataclasses.replace(prot["output"], n_sets=2)
    third = H.run(work, out, resume=True, load_model=load, protocols_=prot, evaluations=("output",))
    assert third["n_new"] > 0 and not third["model_loaded"] and loads == [1]


def test_sigkill_then_resume_equals_an_uninterrupted_run(work, tmp_path):
    full = tmp_path / "full"
    H.run(work, full)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "evaluate_helper.py"), str(work),
                             str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = killed / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_at_kill = len(log.read_text().splitlines())
    assert not (killed / "report.md").exists()
    res = H.run(work, killed, resume=True)
    assert res["n_new"] > 0 and res["n_results"] >= n_at_kill
    assert _values(killed) == _values(full)


@pytest.mark.parametrize("text,problem", [("   ", "empty"), ("x" * 100_000, "2,000")])
def test_a_bad_description_is_refused_before_anything_is_written(work, tmp_path, text, problem):
    from featureatlas.eval.evaluate import EvaluateConfig, evaluate, load_subjects

    subjects = load_subjects([str(work / "desc")])
    rec = subjects[0].records[min(subjects[0].records)]
    rec["descriptions"][0] = {**rec["descriptions"][0], "text": text}
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match="--skip-invalid") as err:
        evaluate(subjects, EvaluateConfig(judges=("embedding",)), H.protocols(), out, progress=False,
                 load_model=H.tiny_model)
    assert problem in str(err.value) and not out.exists()
    # with --skip-invalid it is left out and listed in the report
    res = evaluate(subjects, EvaluateConfig(evaluations=("embedding",), judges=("embedding",), skip_invalid=True),
                   H.protocols(), out, progress=False, load_model=H.tiny_model)
    assert res["skipped_descriptions"] == 1
    assert json.loads((out / "report.json").read_text())["skipped"][0]["feature"] == min(subjects[0].records)


def test_a_dictionary_without_descriptions_is_refused(work, tmp_path):
    from featureatlas.eval.evaluate import EvaluateConfig, evaluate, load_subjects

    subjects = load_subjects([str(work / "desc")])
    for r in subjects[0].records.values():
        r["descriptions"] = []
    with pytest.raises(ConfigError, match="run `featureatlas describe`"):
        evaluate(subjects, EvaluateConfig(judges=("embedding",)), H.protocols(), tmp_path / "x", progress=False,
                 load_model=H.tiny_model)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="--judges local"):
        EvaluateConfig(evaluations=("detection",), judges=("embedding",)).validate()


def test_cli_refuses_bad_input_with_one_line(work, tmp_path):
    env = {**os.environ}
    p = subprocess.run([sys.executable, "-m", "featureatlas.scripts.cli", "evaluate", "--describe",
                        str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "describe" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "featureatlas.scripts.cli", "evaluate", "--describe",
                        str(work / "desc"), "--out", str(tmp_path / "o"), "--evaluations", "bogus"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "bogus" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ground_truth_suite_separates_true_from_shuffled_descriptions(smollm2, tmp_path):
    """Planted features (eval/synthetic.py) through the same pipeline: the offline scorers must tell each feature's
    true description from a shuffled one (AUROC >= 0.9), and the report carries the calibration."""
    from featureatlas.eval.evaluate import EvaluateConfig, Evaluator, make_judges, protocols_for
    from featureatlas.eval.output_eval import OutputEvalConfig
    from featureatlas.eval.synthetic import run_calibration

    cfg = EvaluateConfig(evaluations=("embedding", "output"), judges=("embedding",))
    prot = protocols_for({"output": OutputEvalConfig(n_new=16)})
    ev = Evaluator([], cfg, prot, tmp_path, lambda: smollm2, make_judges(cfg, tmp_path), progress=False)
    cal = {c["evaluation"]: c for c in run_calibration(ev, tmp_path / "calibration")}
    assert cal["embedding"]["auroc"] >= 0.9, cal
    assert cal["output"]["auroc"] >= 0.9, cal
    assert cal["output"]["mean_true"] > 0.5 > cal["output"]["mean_shuffled"]
