"""Semi-NMF decomposition of MLP activations (Shafran, Geiger & Geva 2025), with DiffMeans and
PCA baselines, all saved in one format and usable as Dictionaries.

    from featureatlas.snmf import SNMFConfig, fit_full_batch, fit_streaming, load
    fit = fit_full_batch(A_DxN, SNMFConfig(k=100, p=0.01))      # A: hook dim × tokens
    dic = load("runs/demo/snmf_mlp_hidden.15")                  # SNMFDictionary / DiffMeans / PCA
    codes = dic.encode(x_NxD)                                   # NNLS codes, ≥ 0
"""
from featureatlas.snmf.baselines import fit_diffmeans, fit_pca
from featureatlas.snmf.data import ArrayColumns, StoreColumns, load_matrix
from featureatlas.snmf.dictionary import DiffMeansDictionary, PCADictionary, SNMFDictionary
from featureatlas.snmf.encode import nnls_encode, nnls_residual
from featureatlas.snmf.hierarchy import children_of, fit_levels
from featureatlas.snmf.io import load, load_codes, save_snmf
from featureatlas.snmf.solver import MatrixError, SNMFConfig, SNMFFit, fit_full_batch, snmf_step
from featureatlas.snmf.streaming import fit_streaming
from featureatlas.snmf.train import SNMFJobConfig, train

__all__ = ["ArrayColumns", "DiffMeansDictionary", "MatrixError", "PCADictionary", "SNMFConfig", "SNMFDictionary",
           "SNMFFit", "SNMFJobConfig", "StoreColumns", "children_of", "fit_diffmeans", "fit_full_batch", "fit_levels",
           "fit_pca", "fit_streaming", "load", "load_codes", "load_matrix", "nnls_encode", "nnls_residual",
           "save_snmf", "snmf_step", "train"]
