"""Checkpoints: the on-disk format and safe loading (``format``), what a run's state holds and how
it is restored (``state``), the background writer (``writer``) and plain-weight exports
(``export``)."""
