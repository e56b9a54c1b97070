"""Data: batches from tensors, datasets and loaders (``batches``), device prefetch
(``prefetch``) and accumulation windows over them (``windows``)."""
