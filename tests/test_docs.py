"""docs/cli.md is the CLI reference generated from the Typer app (`make docs`): it must say what
the commands really take, so a change to an option without `make docs` fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current(tmp_path):
    typer = Path(sys.executable).with_name("typer")
    out = tmp_path / "cli.md"
    subprocess.run([str(typer), "idle_export.cli", "utils", "docs", "--name", "idle-export", "--title",
                    "idle-export CLI reference", "--output", str(out)], check=True, capture_output=True,
                   timeout=120)
    assert out.read_text() == (ROOT / "docs" / "cli.md").read_text(), "run `make docs`"
