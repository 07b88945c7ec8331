"""`python -m qknorm ...` is qknorm-train."""

from .cli import main

main()
