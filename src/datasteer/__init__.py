"""datasteer: steer which data an LLM trains on while it trains."""

__version__ = "0.1.0"
