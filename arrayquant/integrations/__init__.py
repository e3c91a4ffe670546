"""Integrations with neural-network libraries (Flax Linen, Flax NNX, Equinox).

Each submodule imports its framework at the top and is never imported by
``import arrayquant``: import the one you use, e.g.
``from arrayquant.integrations import linen``.
"""
