"""Sparse autoencoders: architectures, trainer, sharding, checkpoints, saved format.

Public API:
  SAEConfig, TrainConfig            saes.config    (dataclasses; one SAE / the shared training loop)
  SAE, sae_from_params              saes.sae       (Dictionary protocol, raw activation space)
  save_sae, load_sae                saes.io        (config.json + weights.safetensors)
  train_saes                        saes.trainer   (several SAEs from one stream of batches)
  StoreSource, ArraySource          saes.sources   (batches from an activation store / arrays)
"""
from featureatlas.saes.config import ARCHITECTURES, SAEConfig, SAEConfigError, TrainConfig
from featureatlas.saes.io import load_sae, save_sae
from featureatlas.saes.sae import SAE, sae_from_params
from featureatlas.saes.sources import ArraySource, StoreSource
from featureatlas.saes.trainer import train_saes

__all__ = ["ARCHITECTURES", "SAE", "ArraySource", "SAEConfig", "SAEConfigError", "StoreSource", "TrainConfig",
           "load_sae", "sae_from_params", "save_sae", "train_saes"]
