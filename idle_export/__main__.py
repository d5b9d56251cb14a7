"""`python -m idle_export` runs the CLI (the same app as the `idle-export` script)."""

from idle_export.cli import run

run()
