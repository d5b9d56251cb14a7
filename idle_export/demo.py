"""`idle-export demo`: a seeded IdleViT checkpoint (DeiT or LV-ViT) in the official training
format, exported idle and dense, each checked against torch."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from idle_export.errors import BadInputError
from idle_export.lazy import lazy_module
from idle_export.model.checkpoint import load_checkpoint
from idle_export.model.config import ModelSpec, canonical_arch, check_keep_rate
from idle_export.onnx.export import export_checkpoint
from idle_export.onnx.io import onnx_summary
from idle_export.parity.check import check_onnx

build = lazy_module("idle_export.model.build")  # torch

DEMO_SEED = 0
SCORE_MODE = "folded"  # the default export: the same top-K as the paper's scores, fewer FLOPs


def write_demo_checkpoint(path: Path, arch: str = "deit_small", keep_rate: float = 0.7) -> Path:
    """Seeded random weights (DeiT or LV-ViT; model.build.seeded_state_dict) saved like the
    authors' main.py does (model, model_ema, args)."""
    import torch

    spec = ModelSpec.create(arch, keep_rate)
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
        raise BadInputError(f"cannot create {folder} ({e.strerror})", "pass -o a writable folder") from None
    ckpt_path = folder / f"{arch}_r{keep_rate:g}_demo.pth"
    with status(f"writing seeded checkpoint {ckpt_path}"):
        write_demo_checkpoint(ckpt_path, arch, keep_rate)
        ckpt = load_checkpoint(ckpt_path)
        spec = ckpt.spec()
    rows = []
    for dense in (False, True):
        out = folder / f"{arch}_{'dense' if dense else 'idle'}.onnx"
        with status(f"exporting {out.name}"):
            export_checkpoint(ckpt, spec, out, dense=dense, score_mode=SCORE_MODE)
        with status(f"checking {out.name} against torch at batch {','.join(map(str, batch_sizes))}"):
            report = check_onnx(out, ckpt_path=ckpt, batch_sizes=batch_sizes)  # loaded once, above
        summary = onnx_summary(out)
        cases = report["cases"]
        rows.append({
            "file": str(out),
            "topk": summary["ops"].get("TopK", 0),
            "gmacs": spec.macs(dense=dense, folded_scores=SCORE_MODE == "folded") / 1e9,
            "max_abs": max(c["max_abs"] for c in cases),
            "top1": min(c["top1"] for c in cases),
            "selection": None if dense else min(c["selection"] for c in cases),
            "passed": report["passed"],
            "check": report,
        })
    return {
        "model": spec.describe(),
        "keep_k": list(spec.keep_k),
        "scores": SCORE_MODE,
        "ideal": spec.macs(dense=True) / spec.macs(folded_scores=SCORE_MODE == "folded"),
        "folder": str(folder),
        "checkpoint": str(ckpt_path),
        "rows": rows,
        "passed": all(r["passed"] for r in rows),
    }
