"""kvservice: a distributed, paged KV-cache memory service for LLM inference."""

__version__ = "0.1.0"
