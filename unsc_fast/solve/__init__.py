"""Solve: from the stored statistics to one basis per slot.

Owns which keys a request sums and subtracts, the per-slot energy-basis solves
(``request``), the checks that a request can do what it says (``checks``) and the official
code's class-by-class basis (``incremental``).
"""
