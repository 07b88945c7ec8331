"""qknorm: query/key normalization experiments for Transformer attention."""

__version__ = "0.1.0"
