"""Where and how the arithmetic runs: device choice (``device``), mixed precision and the
GradScaler (``precision``), ``torch.compile`` (``compiling``)."""
