"""mesh402: a peer-to-peer LLM inference mesh that pays the machines doing the work."""

__version__ = "0.1.0"
