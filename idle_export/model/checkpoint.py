"""Safe loading of every checkpoint form IdleViT users have.

Forms: the official training checkpoint ({'model', 'model_ema', 'optimizer', 'args', ...},
args an argparse.Namespace with `arch`, `base_rate`), {'model': sd}, {'state_dict': sd}, a bare
state dict, or a .safetensors file. Pickles are read with torch.load(weights_only=True) and only
argparse.Namespace allowlisted: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from idle_export.errors import CheckpointError
from idle_export.model.config import ModelSpec
from idle_export.model.families import ARCH_NAMES, canonical_arch, family_of, infer_arch, resolve_family
from idle_export.numerics import nonfinite_counts

SAFETENSORS_SUFFIXES = (".safetensors",)


@dataclass
class Checkpoint:
    path: Path
    sha256: str
    state_dict: dict
    source: str  # which entry the weights came from: 'model', 'model_ema', 'state_dict', 'file'
    args: dict = field(default_factory=dict)  # the training args, when the checkpoint has them

    @property
    def arch(self) -> str | None:
        """Architecture from args.arch, else from the weights (infer_arch)."""
        arch = self.args.get("arch")
        if isinstance(arch, str) and arch:
            return arch
        return infer_arch(self.state_dict)

    @property
    def keep_rate(self) -> float | None:
        rate = self.args.get("base_rate")
        if rate is None:
            return None
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise CheckpointError(f"{self.path.name}: args.base_rate is {rate!r}, not a number",
                                  "pass the keep rate the model was trained with: keep=0.7")
        return float(rate)

    def nonfinite(self) -> list[tuple[str, int, int, int]]:
        """The weights with NaN or inf values (numerics.nonfinite_counts)."""
        return nonfinite_counts((k, v.detach().float().numpy()) for k, v in self.state_dict.items()
                                if hasattr(v, "is_floating_point") and v.is_floating_point())

    @property
    def num_classes(self) -> int:
        head = self.state_dict.get("head.weight")
        return int(head.shape[0]) if head is not None and head.ndim == 2 else 1000

    @property
    def img_size(self) -> int:
        pos = self.state_dict.get("pos_embed")
        if pos is not None and pos.ndim == 3:
            side = math.isqrt(int(pos.shape[1]) - 1)
            if side * side == int(pos.shape[1]) - 1:
                return side * 16
        return 224

    @property
    def classes(self) -> list[str] | None:
        names = self.args.get("classes")
        return [str(n) for n in names] if isinstance(names, (list, tuple)) else None

    def family(self, *, arch: str | None = None, method: str | None = None):
        """The family to read it as (families.resolve_family: its keys and args, or --arch /
        --family where they are explicit)."""
        return resolve_family(self.state_dict, self.args, arch=arch, method=method, name=self.path.name)

    def spec(self, *, arch: str | None = None, keep_rate: float | None = None, method: str | None = None,
             **kwargs) -> ModelSpec:
        """ModelSpec from the checkpoint, with the user's --arch / --keep / --family (`method`)
        taking precedence. A family whose torch module reads the authors' args (EViT, DynamicViT)
        builds it there; its K follows from the rate, so explicit idle layers or K are refused."""
        family = self.family(arch=arch, method=method)
        if family.reads_args:
            given = [f"{k}=" for k in ("idle_layers", "keep_k")
                     if kwargs.get(k) is not None]
            if given:
                raise CheckpointError(f"{' and '.join(given)} set idle layers; {family.a_title} "
                                      "model's drop layers and K come from its checkpoint and keep=",
                                      f"drop {' and '.join(given)}")
            if keep_rate is not None:
                keep_rate = float(keep_rate)
            spec = family.torch_module().spec_from_checkpoint(
                self, keep_rate=keep_rate, named=family.owns(self.state_dict) or family.claims(self.args))
            if arch and canonical_arch(arch) != spec.arch:
                raise CheckpointError(f"weights do not fit {canonical_arch(arch)}: {self.path.name} is "
                                      f"{spec.arch}", f"pass arch={spec.arch}")
            return spec
        if arch is None and not (isinstance(self.args.get("arch"), str) and self.args["arch"]):
            cls = self.state_dict.get("cls_token")  # the chosen family's arch of that width
            if cls is not None and cls.ndim == 3:
                arch = family.infer_arch(self.state_dict, int(cls.shape[-1]))
        arch = arch or self.arch
        if arch is None:
            raise CheckpointError(
                f"cannot tell the architecture of {self.path.name}: no args.arch and no cls_token",
                f"pass arch= one of {', '.join(ARCH_NAMES)}",
            )
        arch = canonical_arch(arch)
        dims = family_of(arch).dims_from_weights(self.state_dict, arch, self.path.name)
        rate = keep_rate if keep_rate is not None else self.keep_rate
        return ModelSpec.create(arch, rate, num_classes=self.num_classes, img_size=self.img_size,
                                dims=dims, **kwargs)


def is_safetensors(data: bytes) -> bool:
    """A safetensors file by its content, whatever its name: an 8-byte little-endian header
    length, then that many bytes of JSON object."""
    head = data[:9]
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= len(data) - 8


def _read_bytes(path: Path) -> bytes:
    """The file, read once: its hash and its tensors both come from these bytes."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path.name} ({e.strerror or type(e).__name__})",
                              "check the file's permissions") from None


def _read_raw(path: Path, data: bytes):
    """The deserialised object of `data` (the bytes of `path`); every failure becomes a one-line
    CheckpointError."""
    import io
    import pickle

    import torch

    if path.suffix.lower() in SAFETENSORS_SUFFIXES or is_safetensors(data):
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path.name} is not a readable safetensors file ({str(e).splitlines()[0]})",
                "re-save it with safetensors.torch.save_file or pass the .pth checkpoint",
            ) from None
    import argparse
    import warnings

    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # a plain pickle (not torch.save's zip) of a newer protocol makes torch warn first
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        culprit = _unsafe_global(text) or _pickle_global(path)
        if culprit or "Unsupported global" in text or "GLOBAL" in text or "not an allowed global" in text:
            culprit = culprit or "that is not a tensor"
            raise CheckpointError(
                f"{path.name} refers to the Python object {culprit}, which idle-export will not "
                "unpickle (loading it could run code)",
                "save only tensors: torch.save({'model': model.state_dict()}, path) or safetensors",
            ) from None
        raise CheckpointError(
            f"{path.name} is not a PyTorch checkpoint (the unpickler stopped at: {_unpickler_reason(text)})",
            "pass the .pth file that torch.save wrote, or a .safetensors file",
        ) from None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes make the unpickler fail in any way
        if isinstance(e, OSError) and not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}", "check the path") from None
        # a cut zip archive (torch.save's format) raises RuntimeError or OSError, depending on
        # where it was cut, and ValueError ("negative seek value") when read from memory
        if isinstance(e, (RuntimeError, OSError)) or (isinstance(e, ValueError) and data.startswith(b"PK")):
            text = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(
                f"{path.name} is truncated or corrupt ({text})",
                "copy the checkpoint again; its download or save may have been cut short",
            ) from None
        raise CheckpointError(
            f"{path.name} is not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})",
            "pass the .pth file that torch.save wrote, or a .safetensors file",
        ) from None


def _unsafe_global(text: str) -> str | None:
    import re

    m = re.search(r"(?:Unsupported global: GLOBAL|GLOBAL)\s+([\w.]+)", text)
    return m.group(1) if m else None


def _pickle_global(path: Path) -> str | None:
    """The first Python object a plain pickle refers to (module.name), read without running it:
    torch's unpickler stops at the protocol-4 framing of such a file before it sees the object."""
    import pickletools

    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":  # PROTO: a pickle of protocol 2 or newer (not text that parses)
                return None
            f.seek(0)
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return f"{strings[-2]}.{strings[-1]}"
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - not a pickle, or a damaged one: nothing to name
        return None
    return None


def _unpickler_reason(text: str) -> str:
    """The line of torch's weights-only error that says what stopped it (not its preamble about
    PyTorch 2.6's defaults, nor the link to the docs)."""
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(skip)]
    reason = (useful or lines or ["unreadable"])[0]
    return reason.removeprefix("WeightsUnpickler error:").strip()[:120] or "unreadable"


def _is_state_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_checkpoint(path: str | Path, *, ema: bool = False) -> Checkpoint:
    """Read a checkpoint safely and pick its weights (EMA ones with ema=True)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}", "check the path")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file", "pass the checkpoint file itself")
    data = _read_bytes(path)
    obj = _read_raw(path, data)
    args: dict = {}
    if isinstance(obj, dict) and "args" in obj:
        raw_args = obj["args"]
        args = dict(vars(raw_args)) if hasattr(raw_args, "__dict__") else (
            dict(raw_args) if isinstance(raw_args, dict) else {})
    if ema:
        if not isinstance(obj, dict) or not _is_state_dict(obj.get("model_ema")):
            raise CheckpointError(f"{path.name} has no EMA weights ('model_ema')",
                                  "drop ema=True to use the regular weights")
        state_dict, source = obj["model_ema"], "model_ema"
    elif _is_state_dict(obj):
        state_dict, source = obj, "file"
    else:
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(obj, dict) and _is_state_dict(obj.get(key)):
                state_dict, source = obj[key], key
                break
        else:
            keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(
                f"{path.name} holds no state dict (found: {keys})",
                "expected {'model': state_dict}, a bare state dict or a .safetensors file",
            )
    state_dict = {_strip_prefix(k): v for k, v in state_dict.items()}
    sha256 = hashlib.sha256(data).hexdigest()
    return Checkpoint(path=path, sha256=sha256, state_dict=state_dict, source=source,
                      args=args)


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_weights(vit, state_dict: dict, spec: ModelSpec) -> None:
    """Copy the weights into `vit` (timm keys for DeiT, the official keys for LV-ViT), naming
    every missing, unexpected or misshapen key."""
    import torch

    distilled = [k for k in ("dist_token", "head_dist.weight") if k in state_dict]
    if distilled:  # DeiT's distillation token and second head: a different model, not supported
        raise CheckpointError(f"the weights are a distilled DeiT ({', '.join(distilled)}), which "
                              "idle-export does not support",
                              "use the non-distilled checkpoint of the model, e.g. deit_small_patch16_224 "
                              "rather than deit_small_distilled_patch16_224")
    expected = vit.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (checkpoint {list(state_dict[k].shape)}, {spec.arch} {list(v.shape)})"
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("size mismatch for", mismatched), ("missing keys", missing),
                             ("unexpected keys", unexpected)):
            if items:
                more = f" and {len(items) - 4} more" if len(items) > 4 else ""
                parts.append(f"{label}: {', '.join(items[:4])}{more}")
        guess = infer_arch(state_dict)
        hint = (f"the weights look like {guess}: pass arch={guess}"
                if guess and guess != spec.arch else
                family_of(spec.arch).weights_hint)
        raise CheckpointError(f"weights do not fit {spec.arch}: {'; '.join(parts)}", hint)
    # float weights; integer buffers (BatchNorm's num_batches_tracked) stay as they are
    floats = {k for k, v in expected.items() if torch.is_floating_point(v)}
    bad = [k for k, v in state_dict.items() if k in floats and not torch.is_floating_point(v)]
    if bad:
        raise CheckpointError(f"non-float weights in the checkpoint: {', '.join(bad[:4])}",
                              "pass the float weights of the model")
    vit.load_state_dict({k: v.float() if k in floats else v for k, v in state_dict.items()}, strict=True)
