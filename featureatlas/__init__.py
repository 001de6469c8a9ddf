"""featureatlas: find, describe and score interpretable features in language models (JAX).

The library's one import name. Its sub-packages live in the repository's top-level folders
(fixed by the product brief) and are installed under this name:

    featureatlas.activation_store   models, corpora, harvest, the HDF5 store, the run layer
    featureatlas.saes               sparse autoencoders
    featureatlas.snmf               semi-NMF, DiffMeans, PCA
    featureatlas.eval               the Dictionary protocol and evaluations
    featureatlas.scripts            the `featureatlas` command line and benchmarks
"""
