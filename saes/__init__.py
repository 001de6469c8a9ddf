"""Sparse autoencoders: architectures, trainer, sharding, checkpoints, saved format.

Public API:
  SAEConfig, TrainConfig            saes.config
  SAE, sae_from_params              saes.sae  (Dictionary protocol, raw activation space)
  save_sae, load_sae                saes.io
  train_saes, train_from_store      saes.trainer
"""
from saes.config import ARCHITECTURES, SAEConfig, SAEConfigError, TrainConfig
from saes.io import load_sae, save_sae
from saes.sae import SAE, sae_from_params

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEConfigError", "TrainConfig", "load_sae", "sae_from_params", "save_sae"]
