"""The fictitious-facts benchmark for language-model unlearning (``unsc-fast compare --dataset facts``)."""
