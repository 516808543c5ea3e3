"""Statistics: what observing the model leaves behind.

Owns the forward hooks of ``observe()`` and their all-or-nothing commit (``observation``),
the ``CovarianceStore`` that holds every key's input covariances (``store``), the storage
policies (per label, or one total less a forget pass) and the memory budget (``policies``),
and the Frequent Directions sketches of wide layers (``sketch``).
"""
