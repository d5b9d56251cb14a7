"""The idle-export metadata of an ONNX file, typed: one reader and writer for every stage.

`idle-export onnx` writes `metadata_props` with keys `idle_export.<field>` and JSON values (the
ModelSpec fields, dense, score_mode, checkpoint_sha256, classes …); later stages add precision,
quantization, fp32_nodes, optimized, target. `OnnxMetadata` keeps the props exactly as stored (so files
round-trip byte for byte) and reads each field with its default and a one-line error when a
value is not valid JSON. Values are decoded once per object (the props never change), the
ModelSpec built once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from idle_export.errors import BadInputError
from idle_export.model.config import ModelSpec
from idle_export.onnx.io import load_onnx_header

PREFIX = "idle_export."


@dataclass(frozen=True)
class OnnxMetadata:
    """metadata_props of one ONNX model (all keys, as stored)."""

    props: Mapping[str, str] = field(default_factory=dict)
    _decoded: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # JSON, once

    # ------------------------------------------------------------------ read
    @classmethod
    def of(cls, proto) -> OnnxMetadata:
        """The metadata of a loaded onnx.ModelProto."""
        return cls({p.key: p.value for p in proto.metadata_props})

    @classmethod
    def read(cls, path: str | Path) -> OnnxMetadata:
        """The metadata of an ONNX file, without loading its weights."""
        return cls.of(load_onnx_header(path))

    def get(self, name: str, default: Any = None) -> Any:
        """The JSON value of `idle_export.<name>`, or `default` when absent."""
        key = PREFIX + name
        if key not in self.props:
            return default
        if key not in self._decoded:  # each value is decoded once (the props never change)
            try:
                self._decoded[key] = json.loads(self.props[key])
            except ValueError:
                raise BadInputError(f"the ONNX metadata {key} is not valid JSON ({self.props[key][:40]!r})",
                                    "re-export the model with `idle-export onnx`") from None
        return self._decoded[key]

    @property
    def has_spec(self) -> bool:
        return PREFIX + "arch" in self.props

    @cached_property
    def spec(self) -> ModelSpec:
        """The ModelSpec the file was exported with (BadInputError when it has none)."""
        if not self.has_spec:
            raise BadInputError("the ONNX file has no idle-export metadata (arch, idle layers, K)",
                                "export it with `idle-export onnx CKPT.pth`")
        try:
            return ModelSpec.from_metadata(dict(self.props))
        except BadInputError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # hand-edited or foreign props
            raise BadInputError(f"the ONNX file's idle_export.* metadata is unreadable ({type(e).__name__}: "
                                f"{str(e)[:80]})", "re-export the model with `idle-export onnx`") from None

    @property
    def dense(self) -> bool:
        return bool(self.get("dense", False))

    @property
    def score_mode(self) -> str:
        return self.get("score_mode", "official")

    @property
    def form(self) -> str:
        """standard (TopK/GatherElements/ScatterElements) or plugin (IdleSelect/IdleScatter
        nodes that are also model-local functions: `idle-export onnx --plugin`)."""
        return self.get("form", "standard")

    @property
    def elastic(self) -> dict | None:
        """The elastic form's record (`idle-export onnx --elastic`: input, default rate,
        exponents, min_rate, clamp rule; onnx.elastic), or None for a fixed-K file."""
        value = self.get("elastic")
        return value if isinstance(value, dict) else None

    @property
    def precision(self) -> str:
        return self.get("precision", "fp32")

    @property
    def idle_layers(self) -> list[int] | None:
        return self.get("idle_layers")

    @property
    def classes(self) -> list[str] | None:
        """Class names, when the checkpoint had them (a list of strings, else None)."""
        try:
            value = self.get("classes")
        except BadInputError:  # optional information: unreadable names are no names
            return None
        if isinstance(value, list) and all(isinstance(c, str) for c in value):
            return value
        return None

    def ours(self) -> dict[str, str]:
        """Only the idle_export.* props, sorted by key (sidecars, Triton parameters)."""
        return {k: v for k, v in sorted(self.props.items()) if k.startswith(PREFIX)}

    # ------------------------------------------------------------------ write
    def updated(self, **values: Any) -> OnnxMetadata:
        """A copy with `idle_export.<name>` set to the JSON of each value."""
        return OnnxMetadata({**self.props, **{PREFIX + k: json.dumps(v) for k, v in values.items()}})

    def write(self, proto) -> None:
        """Replace the model's metadata_props with these props (sorted by key)."""
        del proto.metadata_props[:]
        for key, value in sorted(self.props.items()):
            proto.metadata_props.add(key=key, value=value)
