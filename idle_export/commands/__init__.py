"""CLI commands beyond onnx/check/demo; each module registers its commands on cli.app with
cli.command. Import them here (light imports only: `idle-export --help` must stay instant)."""
from . import serve  # noqa: F401
from . import trt  # noqa: F401
