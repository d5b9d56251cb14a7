"""`python -m idle_export` runs the CLI (the same app as the `idle-export` script)."""

from .cli import run

run()
