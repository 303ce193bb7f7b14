"""`python -m pipeline ...` is the same as `gradbench ...`."""

from .cli import cli

cli(prog_name="gradbench")
