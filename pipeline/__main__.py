"""`python -m pipeline ...` is the same as `gradbench ...`."""

from .cli import main

main()
