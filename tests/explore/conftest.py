"""A small seeded LV-ViT checkpoint (official training-checkpoint format, the photos' class names):
`show` and `sweep` must work on every architecture the project exports, not only DeiT."""

from __future__ import annotations

import argparse

import pytest
from typer.testing import CliRunner

from idle_export.cli import app

runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one error line, last on stderr (progress lines may come before it), no traceback."""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert not any(line.startswith("error") for line in lines[:-1]), result.stderr
    assert "Traceback" not in result.output and "(hint: " in lines[-1]
    return lines[-1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IDLE_EXPORT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def lvvit_ckpt(tmp_path_factory):
    import torch

    from idle_export.data.inputs import PHOTO_NAMES
    from idle_export.model.build import seeded_state_dict
    from idle_export.model.config import ModelSpec

    spec = ModelSpec.create("lvvit_s", 0.7, num_classes=10,
                            dims=dict(embed_dim=128, depth=16, num_heads=2, stem_width=16))
    path = tmp_path_factory.mktemp("lvvit") / "lvvit_s_narrow.pth"
    torch.save({"model": seeded_state_dict(spec),
                "args": argparse.Namespace(arch="lvvit_s", base_rate=0.7, num_classes=10,
                                           classes=list(PHOTO_NAMES))}, path)
    return path
