"""Evaluation of sparse dictionaries: the Dictionary protocol, reconstruction and splice metrics.

    from featureatlas.eval import evaluate_dictionary, evaluate_reconstruction, splice_metrics, scalars
    from featureatlas.eval import metrics   # streaming accumulator: metrics.init / update / finalize
"""
from featureatlas.eval import metrics
from featureatlas.eval.dictionary import Dictionary
from featureatlas.eval.metrics import evaluate_dictionary, evaluate_reconstruction, scalars
from featureatlas.eval.splice import contexts_from_store, splice_metrics

__all__ = [
    "Dictionary", "contexts_from_store", "evaluate_dictionary", "evaluate_reconstruction", "metrics", "scalars",
    "splice_metrics",
]
