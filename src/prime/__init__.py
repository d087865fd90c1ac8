"""prime: a verifiable compute pool for AI training on GPUs owned by strangers."""

__version__ = "0.1.0"
