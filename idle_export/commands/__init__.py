"""CLI commands beyond onnx/check/demo; each module registers its commands on cli.app with
cli.command. Import them here (light imports only: `idle-export --help` must stay instant)."""
