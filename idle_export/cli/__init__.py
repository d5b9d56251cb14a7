"""The `idle-export` command line: `app` (cli/app.py) plus one module per command, registered
here in the order `--help` lists them. Command modules import only light library modules at top
level; torch, onnx and onnxruntime load inside the library functions they call, so
`idle-export --help` stays instant."""

# isort: off
from idle_export.cli.app import app
from idle_export.cli import onnx, check, trt, calibrate, bench, serve, demo  # noqa: F401 (registers)
# isort: on


def run() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "run"]
