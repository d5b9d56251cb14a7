"""CLI commands beyond onnx/check/demo; each module registers its commands on cli.app with
cli.command. Import them here (light imports only: `idle-export --help` must stay instant)."""
from . import (
    bench,  # noqa: F401
    calibrate,  # noqa: F401
    serve,  # noqa: F401
    trt,  # noqa: F401
)
