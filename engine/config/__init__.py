"""Configuration: ``EngineConfig`` (``engine_config``), optimiser and scheduler specs (``specs``),
config files in TOML/JSON (``file``) and the shared attrs field validators (``validators``)."""
