"""The command line (``strategy-engine`` and ``python -m engine``): the edge of the engine, the one
place inside ``engine/`` that wires concrete strategies and callbacks (``main``)."""
