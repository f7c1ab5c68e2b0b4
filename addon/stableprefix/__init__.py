"""stableprefix: keep LLM prompt prefixes byte-stable so model servers reuse their prompt cache."""

__version__ = "0.1.0"
