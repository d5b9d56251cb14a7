"""`idle-export calibrate`: FP32 ONNX → INT8 Q/DQ ONNX (ONNX Runtime's quantizer, or NNCF for
--target openvino), with the token-selection path (scores, TopK, Gather/Scatter indices) left in
FP32."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from idle_export import api
from idle_export.cli.app import command
from idle_export.cli.options import JsonOut, echo_err, status, write_json
from idle_export.data.images import ImagesSkippedWarning
from idle_export.errors import BadInputError
from idle_export.quantize.qdq import DEFAULT_NUM, default_int8_path


@command("calibrate", api_names={"batch_size": "calib_batch"})
def calibrate_cmd(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX file written by `idle-export onnx`.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="INT8 ONNX file to write "
                                                   "(default: MODEL.int8.TARGET.onnx, one per target)."
                                                   )] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Calibration images: a folder "
                                                   "of JPEG/PNG (searched recursively), a .txt list of "
                                                   "paths, or one image. Default: the built-in set "
                                                   "(skimage.data photos).")] = None,
    num: Annotated[int | None, typer.Option("--num", metavar="N", help="Calibration images (0: all in "
                                            "--images; default: up to 512, all of a smaller folder). "
                                            "Fewer usable images than an explicit --num is an error."
                                            )] = None,
    method: Annotated[str, typer.Option("--method", help="Activation ranges: minmax, percentile "
                                        "(99.999) or entropy.")] = "minmax",
    target: Annotated[str, typer.Option("--target", help="ort: fastest Q/DQ placement for ONNX "
                                        "Runtime CPU (uses com.microsoft BiasGelu); trt: symmetric "
                                        "Q/DQ, float biases, standard ops (TensorRT); openvino: NNCF's "
                                        "placement for OpenVINO CPU (the openvino extra; minmax)."
                                        )] = "ort",
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per "
                                              "output channel (default) or one per tensor.")] = True,
    activations: Annotated[str, typer.Option("--activations", help="Activation ranges: symmetric "
                                             "(zero point 0) or asymmetric; auto: the target's (ort "
                                             "asymmetric; trt and openvino symmetric). For openvino, "
                                             "asymmetric is NNCF's MIXED preset: try it if INT8 "
                                             "accuracy drops.")] = "auto",
    weight_range: Annotated[str, typer.Option("--weight-range", help="reduced: 7-bit weights (ONNX "
                                              "Runtime's reduce_range), exact on x86 CPUs without VNNI "
                                              "and as fast elsewhere; full: 8-bit, exact only where "
                                              "the runtime has VNNI/AMX or sets session."
                                              "x64quantprecision (this tool's sessions do, Triton's "
                                              "cannot); auto: the target's (ort reduced, trt full, "
                                              "openvino NNCF's own).")] = "auto",
    calib_batch: Annotated[int, typer.Option("--calib-batch", metavar="N", help="Images per "
                                             "calibration step (memory vs speed).")] = 16,
    batch: Annotated[str | None, typer.Option("--batch", hidden=True)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Which images of a folder are drawn.")] = 0,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse preprocessed images from "
                                        "$IDLE_EXPORT_CACHE/calib (default "
                                        "${XDG_CACHE_HOME:-~/.cache}/idle-export/calib).")] = True,
    json_out: JsonOut = None,
):
    """Calibrate on real images and write an INT8 model; check it with
    `idle-export check INT8.onnx --against FP32.onnx --images DIR`."""
    import warnings

    if batch is not None:
        raise BadInputError("calibrate's batch size is --calib-batch (--batch lists the batch sizes that "
                            "check and bench run)", f"e.g. --calib-batch {batch}")
    output = output or default_int8_path(model, target)
    with status(f"calibrating {model.name}") as progress, warnings.catch_warnings():
        warnings.simplefilter("ignore", ImagesSkippedWarning)
        report = api.quantize(model, output, images=images, num=num, method=method, target=target,
                              per_channel=per_channel, batch_size=calib_batch, seed=seed, cache=cache,
                              activations=activations, weight_range=weight_range,
                              progress=progress.update)
    info = report["images"]
    if info["skipped_count"]:
        echo_err(f"warning: skipped {info['skipped_count']} unreadable file(s) in {info['source']}, e.g. "
                 f"{info['skipped'][0]}")
    if info["converted"]:
        echo_err(f"note: converted {info['converted']} grayscale/RGBA/palette image(s) to RGB")
    if num is None and images is not None and report["num_images"] < DEFAULT_NUM:
        echo_err(f"note: calibrated on all {report['num_images']} usable image(s) in {images} (fewer than "
                 f"the default {DEFAULT_NUM}; pass --num N to require a number)")
    echo_err(f"wrote {output} (INT8 {report['format']} for {target}, {report['method']} on "
             f"{report['num_images']} image(s) from {info['source']}; "
             f"{'7-bit weights; ' if report.get('weight_range') == 'reduced' else ''}score path FP32 in "
             f"{report['score_matmuls_fp32']}/{report['topk']} idle layers; "
             f"{report['size_bytes'] / 2**20:.1f} MiB, {report['seconds']:.0f} s)")
    if report.get("openvino_ir"):
        xml = Path(report["openvino_ir"][0])
        echo_err(f"wrote {xml} + {xml.with_suffix('.bin').name} (OpenVINO IR: INT8 GEMMs, the token scores "
                 f"in f32 where OpenVINO computes in bf16: compile {xml.name}, not {output.name})")
    if json_out:
        write_json(report, json_out)
