"""Evaluation of sparse dictionaries: the Dictionary protocol, reconstruction and splice metrics.

    from eval import evaluate_dictionary, evaluate_reconstruction, splice_metrics, scalars
    from eval import metrics   # streaming accumulator: metrics.init / update / finalize
"""
from eval import metrics
from eval.dictionary import Dictionary
from eval.metrics import evaluate_dictionary, evaluate_reconstruction, scalars
from eval.splice import contexts_from_store, splice_metrics

__all__ = [
    "Dictionary", "contexts_from_store", "evaluate_dictionary", "evaluate_reconstruction", "metrics", "scalars",
    "splice_metrics",
]
