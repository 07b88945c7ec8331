"""qknorm: query/key normalization experiments for Transformer attention."""

__version__ = "0.1.0"

import os as _os

# MKL picks kernels by memory alignment unless told not to, so two runs with the same seed could differ
# in the last bits on CPU; conditional numerical reproducibility makes them identical at no measured
# cost. Set before torch loads MKL; a value the user exported wins.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
