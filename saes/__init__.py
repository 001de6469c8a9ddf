"""Sparse autoencoders: architectures, trainer, sharding, checkpoints, saved format.

Public API:
  ARCHITECTURES                     saes.architectures (one record per architecture, by name)
  SAEConfig, SAETrainConfig         saes.config        (dataclasses; one SAE / the shared training loop)
  SAE, sae_from_params              saes.sae           (Dictionary protocol, raw activation space)
  save_sae, load_sae                saes.io            (config.json + weights.safetensors, published together)
  train_saes                        saes.trainer       (several SAEs from one stream of batches)
  StoreBatches, ArrayBatches        saes.sources       (batches from an activation store / arrays)
"""
from featureatlas.saes.architectures import ARCHITECTURES
from featureatlas.saes.config import SAEConfig, SAEConfigError, SAETrainConfig
from featureatlas.saes.io import load_sae, save_sae
from featureatlas.saes.sae import SAE, sae_from_params
from featureatlas.saes.sources import ArrayBatches, StoreBatches
from featureatlas.saes.trainer import train_saes

__all__ = ["ARCHITECTURES", "SAE", "ArrayBatches", "SAEConfig", "SAEConfigError", "SAETrainConfig", "StoreBatches",
           "load_sae", "sae_from_params", "save_sae", "train_saes"]
