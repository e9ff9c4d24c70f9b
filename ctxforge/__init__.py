"""ctxforge: turn an instruct LLM into a million-token-context instruct LLM, on Ray."""

__version__ = "0.1.0"
