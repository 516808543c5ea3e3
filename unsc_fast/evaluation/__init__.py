"""The evaluation harness: datasets, scenarios, experiment models, metrics, unlearning methods,
the comparison runner, its report, the demo and the CLI.

It imports the core library (``unsc_fast``) through its public names only; the core never
imports this package. scikit-learn and matplotlib live here: ``pip install unsc_fast[eval]``.
"""
