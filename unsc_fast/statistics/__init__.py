"""Statistics: what observing the model leaves behind.

Owns the forward hooks of ``observe()`` (``observation``), the ``CovarianceStore`` that
holds every key's input covariances (``store``), the storage policies (per label, or one
total less a forget pass: ``policies``) and the Frequent Directions sketches of wide layers
(``sketch``).
"""
