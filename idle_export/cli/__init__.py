"""The `idle-export` command line: `app` (cli/app.py) plus one module per command, registered
here in the order `--help` lists them. Command modules import only light library modules at top
level; torch, onnx and onnxruntime load inside the library functions they call, so
`idle-export --help` stays instant."""

# isort: off
from idle_export.cli.app import app
from idle_export.cli import onnx, check, trt, calibrate, bench, show, sweep, serve, serve_bench, demo  # noqa: F401 (registers)
# isort: on


GLOBAL_FLAGS = ("--debug", "--quiet", "-q")


def run() -> None:
    """Console-script entry point. The global flags are accepted after the command too
    (`idle-export onnx x.pth --debug`), where users type them."""
    import sys

    args = sys.argv[1:]
    if "--" in args:  # nothing after a literal -- is moved
        head, tail = args[: args.index("--")], args[args.index("--"):]
    else:
        head, tail = args, []
    flags = [a for a in head if a in GLOBAL_FLAGS]
    app(args=[*flags, *[a for a in head if a not in GLOBAL_FLAGS], *tail])


__all__ = ["app", "run"]
