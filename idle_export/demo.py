"""`idle-export demo`: a seeded checkpoint (IdleViT on DeiT or LV-ViT, EViT, DynamicViT) in its
authors' training format, exported idle (or pruned) and dense, each checked against torch."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from idle_export.errors import BadInputError
from idle_export.lazy import lazy_module
from idle_export.model.checkpoint import load_checkpoint
from idle_export.model.config import ModelSpec, canonical_arch, check_keep_rate
from idle_export.model.families import family_of
from idle_export.onnx.export import export_checkpoint
from idle_export.onnx.io import onnx_summary
from idle_export.parity.check import check_onnx

build = lazy_module("idle_export.model.build")  # torch

DEMO_SEED = 0


def write_demo_checkpoint(path: Path, arch: str = "deit_small", keep_rate: float = 0.7) -> Path:
    """Seeded random weights (model.build.seeded_state_dict) saved like the authors' main.py
    does (IdleViT: model, model_ema, args); a family whose torch module writes its authors' own
    format (EViT, DynamicViT: write_demo_checkpoint) writes it there."""
    import torch

    spec = ModelSpec.create(arch, keep_rate)
    own = getattr(family_of(spec.arch).torch_module(), "write_demo_checkpoint", None)
    if own is not None:
        tmp = own(path.with_name(f".{path.name}.tmp"), spec, DEMO_SEED)
        tmp.replace(path)
        return path
    sd = build.seeded_state_dict(spec, DEMO_SEED)
    args = argparse.Namespace(arch=spec.arch, base_rate=keep_rate, input_size=spec.img_size,
                              model_ema=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": sd, "model_ema": sd, "args": args, "epoch": 0}, tmp)
    tmp.replace(path)
    return path


def run_demo(folder: Path, *, arch: str = "deit_small", keep_rate: float = 0.7,
             batch_sizes=(1, 7, 32), status=None) -> dict:
    status = status or (lambda msg: contextlib.nullcontext())
    arch = canonical_arch(arch)
    keep_rate = check_keep_rate(keep_rate)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot create {folder} ({e.strerror})",
                            "pass folder= a writable folder") from None
    ckpt_path = folder / f"{arch}_r{keep_rate:g}_demo.pth"
    scores = family_of(arch).default_scores  # IdleViT: folded, the same top-K with fewer FLOPs
    with status(f"writing seeded checkpoint {ckpt_path}"):
        write_demo_checkpoint(ckpt_path, arch, keep_rate)
        ckpt = load_checkpoint(ckpt_path)
        spec = ckpt.spec()
    rows = []
    for dense in (False, True):
        out = folder / f"{arch}_{'dense' if dense else 'idle'}.onnx"
        with status(f"exporting {out.name}"):
            export_checkpoint(ckpt, spec, out, dense=dense, score_mode=scores)
        with status(f"checking {out.name} against torch at batch {','.join(map(str, batch_sizes))}"):
            report = check_onnx(out, ckpt_path=ckpt, batch_sizes=batch_sizes)  # loaded once, above
        summary = onnx_summary(out)
        cases = report["cases"]
        rows.append({
            "file": str(out),
            "topk": summary["ops"].get("TopK", 0),
            "gmacs": spec.macs(dense=dense, folded_scores=scores == "folded") / 1e9,
            "max_abs": max(c["max_abs"] for c in cases),
            "top1": min(c["top1"] for c in cases),
            "selection": None if dense else min(c["selection"] for c in cases),
            "passed": report["passed"],
            "check": report,
        })
    return {
        "model": spec.describe(),
        "keep_k": list(spec.keep_k),
        "scores": scores,
        "ideal": spec.macs(dense=True) / spec.macs(folded_scores=scores == "folded"),
        "folder": str(folder),
        "checkpoint": str(ckpt_path),
        "rows": rows,
        "passed": all(r["passed"] for r in rows),
    }
