"""Datasets: the custom CIR folder format (:mod:`.custom`), the synthetic benchmark
(:mod:`.synthetic`) and the training-side loaders built on them.

Kept free of imports so that ``import csmcir.data.custom`` pulls in neither torch nor PIL.
"""
