"""Speed measurements: the engine against hand-written loops and peer trainers, interleaved."""
