"""HALO: semantic-aware distributed LLM inference over lossy edge networks."""

__version__ = "0.1.0"
