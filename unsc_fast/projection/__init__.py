"""Projection: from the bases to null-space updates.

Owns the bases of the last build with their cheaper complements (``bases``), applying them
to a parameter-shaped tensor and the residual check (``apply``), and which tensor the
optimizer projects per param group: the gradient, the change, or both (``plan``).
"""
