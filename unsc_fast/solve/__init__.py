"""Solve: from the stored statistics to one basis per slot, on this process.

Owns which keys a request sums and subtracts and the per-slot energy-basis solves
(``request``), the checks that a request can do what it says (``checks``), which factor of
each projection to keep (``complement``) and the official code's class-by-class basis
(``incremental``). Nothing here communicates: a distributed build pools the statistics
before and shares the bases after (``unsc_fast.distributed``).
"""
