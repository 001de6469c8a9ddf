"""Evaluation of sparse dictionaries: the Dictionary protocol, reconstruction and splice metrics."""
from eval.dictionary import Dictionary
from eval.metrics import evaluate_reconstruction, finalize, init, scalars, update

__all__ = ["Dictionary", "evaluate_reconstruction", "init", "update", "finalize", "scalars"]
