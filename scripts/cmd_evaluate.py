"""`featureatlas evaluate`: score descriptions (input and output side), steer with features, report.

    featureatlas evaluate --describe runs/x/describe-sae runs/x/describe-snmf --out runs/x/eval
    featureatlas evaluate ... --evaluations cheap embedding input output steering probing --judges embedding local
    featureatlas evaluate ... --judges openai --base-url http://127.0.0.1:8080/v1 --api-model m  # key: $OPENAI_API_KEY

Every result is cached by (feature, description, judge, protocol, seed) in --out/results.jsonl, so a
rerun (--resume) makes no model or judge call for what it has; a killed run resumes where it stopped.
Writes <out>/<dictionary>/records.jsonl (records with scores), <out>/catalog/ (index.html, sortable and
filterable by score) and <out>/report.md, report.json and PNG charts (eval/evaluate.py, eval/report.py).
"""
from __future__ import annotations

import dataclasses

from featureatlas.activation_store.configs import RunOptions, add_config_arguments, config_from_args, flags_of, setting


@dataclasses.dataclass(kw_only=True)
class EvaluateJob(RunOptions):
    """Inputs and output of the evaluate job."""

    describe: tuple[str, ...] = setting()
    """Describe run directories (one per dictionary) whose descriptions are scored."""
    out: str = setting()
    """Run directory for results, records, catalog and report."""
    calibrate: bool = setting(False)
    """Also run the synthetic ground-truth suite (planted features) and put its calibration in the report."""


def register(subparsers) -> None:
    from featureatlas.eval.evaluate import EvaluateConfig, protocol_classes

    p = subparsers.add_parser("evaluate", help="score descriptions, steer with features, write a report",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p, EvaluateJob)
    add_config_arguments(p, EvaluateConfig, title="what to evaluate")
    for name, cls in protocol_classes().items():  # flags --<name>-<field>, e.g. --output-targets
        add_config_arguments(p, cls, title=f"{name} protocol", prefix=name)
    p.set_defaults(func=run)


def run(args) -> int:
    from featureatlas.eval.evaluate import EvaluateConfig, evaluate, load_subjects, protocol_classes

    job = config_from_args(EvaluateJob, args).validate()
    cfg = config_from_args(EvaluateConfig, args).validate()
    protocols = {name: config_from_args(cls, args, prefix=name).validate() for name, cls in protocol_classes().items()}
    subjects = load_subjects(job.describe)
    results = evaluate(subjects, cfg, protocols, job.out, resume=job.resume, overwrite=job.overwrite,
                       flags=flags_of(EvaluateJob), progress=job.progress, calibrate=job.calibrate)
    print(f"evaluate: {results['n_results']} results ({results['n_new']} new) for "
          f"{', '.join(s.name for s in subjects)} -> {results['report']}")
    return 0
