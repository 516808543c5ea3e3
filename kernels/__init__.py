"""Triton kernels of unsc_fast, installed as ``unsc_fast.kernels``.

One file per op. Callers never import these directly: ``unsc_fast.ops`` dispatches.
"""
