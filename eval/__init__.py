"""Evaluation of sparse dictionaries: the Dictionary protocol, reconstruction and splice metrics.

    from eval import evaluate_dictionary, evaluate_reconstruction, splice_metrics
"""
from eval.dictionary import Dictionary
from eval.metrics import evaluate_dictionary, evaluate_reconstruction, finalize, init, scalars, update
from eval.splice import contexts_from_store, splice_metrics

__all__ = [
    "Dictionary", "contexts_from_store", "evaluate_dictionary", "evaluate_reconstruction", "finalize", "init",
    "scalars", "splice_metrics", "update",
]
