"""Compare two runners: logits error, top-1/top-5 agreement and token-selection agreement.

Selection agreement compares *sets* of kept tokens per image and idle layer (the order TopK
returns among the kept ones does not change the result). A differing set is counted as a tie,
not a failure, when every token in the difference has a reference score within
tie_atol + tie_rtol·max|s| of the K-th largest score (max|s| over that image's scores): there
the choice is up to the precision's rounding (FP16 moves later layers' scores by ~1-3% of their
range). Both figures are reported: `selection_raw` (identical sets) and `selection` (ties
counted as agreeing); only the second is held to the tolerance. With `after_tie` (bf16), an
image's layers after its first tie count as agreeing: a token kept in one run and idle in the
other leaves that layer with another value, so later scores differ by more than rounding.
Reference scores come from whichever runner records them (torch and ONNX Runtime runners do).

EViT and DynamicViT drop tokens: each selection is a TopK position in the sequence the previous
drop layer left, in its order. Given the spec, both runs are first mapped to patch numbers
(to_patch_ids), so a later layer compares the same tokens even where an earlier one kept the
same set in another order.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from idle_export.model.config import Tolerances
from idle_export.numerics import describe_nonfinite, nonfinite_counts
from idle_export.onnx.io import SELECTION_PREFIX


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-30)))


def _topk_sets(x: np.ndarray, k: int) -> list[set]:
    return [set(row) for row in np.argsort(-x, axis=1, kind="stable")[:, :k]]


def compare_outputs(out_a: dict, out_b: dict, scores: list[np.ndarray] | None,
                    tol: Tolerances, cand_scores: list[np.ndarray] | None = None) -> dict:
    """Figures for one batch; `out_b` is the reference, `scores` its token scores per idle layer.
    `cand_scores`, the candidate's own scores on the same scale, widen the tie band to what the
    candidate's rounding moved them (twice the largest score difference in that image)."""
    a, b = out_a["logits"].astype(np.float64), out_b["logits"].astype(np.float64)
    diff = np.abs(a - b)
    top1, top1_ties = _top1(a, b, tol)
    case = {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / max(np.abs(b).max(), 1e-30)),
        "cosine_min": _cosine_min(a, b),
        "top1": top1,
        "top5": float(np.mean([x == y for x, y in zip(_topk_sets(a, 5), _topk_sets(b, 5))])),
    }
    case.update(top1_ties)
    layers = sorted({k for k in out_a if k.startswith(SELECTION_PREFIX)}
                    & {k for k in out_b if k.startswith(SELECTION_PREFIX)},
                    key=lambda k: int(k[len(SELECTION_PREFIX):]))
    per_layer, raw_per_layer, ties, matches, raw, total = {}, {}, 0, 0, 0, 0
    tied: set[int] = set()  # images whose kept set already differed by a tie in an earlier layer
    if tol.after_tie:
        cand_scores = None  # after a flipped tie the candidate's scores differ by more than rounding
    for li, key in enumerate(layers):
        sa, sb = out_a[key], out_b[key]
        same = identical = 0
        for row in range(sa.shape[0]):
            set_a, set_b = set(sa[row].tolist()), set(sb[row].tolist())
            if set_a == set_b:
                same += 1
                identical += 1
            elif tol.after_tie and row in tied:
                same += 1
            elif scores is not None and _is_tie(scores[li][row], set_a ^ set_b, len(set_b), tol,
                                                None if cand_scores is None else cand_scores[li][row]):
                same += 1
                ties += 1
                tied.add(row)
        per_layer[key[len(SELECTION_PREFIX):]] = same / sa.shape[0]
        raw_per_layer[key[len(SELECTION_PREFIX):]] = identical / sa.shape[0]
        matches += same
        raw += identical
        total += sa.shape[0]
    if layers:
        case["selection"] = matches / total
        case["selection_raw"] = raw / total
        case["selection_per_layer"] = per_layer
        case["selection_raw_per_layer"] = raw_per_layer
        case["selection_ties"] = ties
    failures = []
    nonfinite = nonfinite_counts([("candidate", out_a["logits"]), ("reference", out_b["logits"])])
    if nonfinite:  # NaN compares false with every tolerance: name it and fail
        case["nonfinite_logits"] = {name: {"nan": nan, "inf": inf, "of": size}
                                    for name, nan, inf, size in nonfinite}
        failures.append(f"logits not finite: {describe_nonfinite(nonfinite)}")
    if case["max_abs"] > tol.max_abs:
        failures.append(f"max abs error {case['max_abs']:.3g} > {tol.max_abs:g}")
    if case["top1"] < tol.min_top1:
        failures.append(f"top-1 agreement {case['top1']:.2%} < {tol.min_top1:.2%}")
    if layers and case["selection"] < tol.min_selection:
        failures.append(f"token-selection agreement {case['selection']:.2%} < {tol.min_selection:.2%}")
    case["failures"] = failures
    case["passed"] = not failures
    return case


def _top1(a: np.ndarray, b: np.ndarray, tol: Tolerances) -> tuple[float, dict]:
    """Top-1 agreement; with tol.top1_margin, a disagreement where the reference's logits of the
    two classes are that close counts as agreeing (then also `top1_raw` and `top1_ties`)."""
    top_a, top_b = a.argmax(1), b.argmax(1)
    agree = top_a == top_b
    if tol.top1_margin <= 0:
        return float(agree.mean()), {}
    rows = np.arange(len(b))
    ties = ~agree & (b[rows, top_b] - b[rows, top_a] <= tol.top1_margin)
    return float((agree | ties).mean()), {"top1_raw": float(agree.mean()), "top1_ties": int(ties.sum())}


def _is_tie(scores: np.ndarray, differing: set, k: int, tol: Tolerances,
            cand: np.ndarray | None = None) -> bool:
    """NaN scores (tokens a dropping family no longer had; to_patch_ids) are never ties."""
    valid = scores[np.isfinite(scores)]
    if len(valid) < k:
        return False
    kth = np.sort(valid)[::-1][k - 1]
    limit = tol.tie_atol + tol.tie_rtol * float(np.abs(valid).max())
    if cand is not None and cand.shape == scores.shape:
        # a swap of tokens j and the K-th needs |s_j - s_K| < |e_j| + |e_K| ≤ 2·max|e|
        moved = np.abs(cand - scores)
        if np.isfinite(moved).any():
            limit = max(limit, 2.0 * float(np.nanmax(moved)))
    return all(abs(scores[j] - kth) <= limit for j in differing)


def to_patch_ids(out: dict, scores: list[np.ndarray] | None, spec) -> tuple[dict, list | None]:
    """A dropping family's selections (TopK positions in the sequence the previous drop layer
    left, highest score first) as patch numbers 0..P-1 (EViT's token fused at the d-th drop layer:
    P+d), and its scores per layer placed at those numbers (NaN for tokens already gone).
    Unchanged without a spec or for an idling family (positions are patch numbers there)."""
    keys = sorted((k for k in out if k.startswith(SELECTION_PREFIX)),
                  key=lambda k: int(k[len(SELECTION_PREFIX):]))
    if spec is None or not spec.drops_tokens or not keys:
        return out, scores
    p, b = spec.num_patches, out[keys[0]].shape[0]
    ids = np.broadcast_to(np.arange(p), (b, p))
    mapped, placed = dict(out), []
    for d, key in enumerate(keys):
        if scores is not None and d < len(scores) and np.shape(scores[d]) == ids.shape:
            full = np.full((b, p + len(keys)), np.nan)
            np.put_along_axis(full, ids, scores[d], axis=1)
            placed.append(full)
        kept = np.take_along_axis(ids, out[key].astype(np.int64), axis=1)
        mapped[key] = kept
        ids = np.concatenate([kept, np.full((b, 1), p + d)], axis=1) if spec.fuse_token else kept
    return mapped, placed if scores is not None and len(placed) == len(keys) else None


def compare_runners(runner_a, runner_b, inputs: dict[str, np.ndarray], batch_sizes: list[int],
                    tol: Tolerances, spec=None) -> dict:
    """Run both runners on the first `bs` images of every input set for each batch size; `spec`:
    the model's, for a dropping family's selections (to_patch_ids)."""
    cases = []
    with runner_a, runner_b:
        for set_name, images in inputs.items():
            for bs in batch_sizes:
                feed = {"images": images[:bs]}
                out_a, scores_a = to_patch_ids(runner_a.infer(feed), getattr(runner_a, "last_scores", None),
                                               spec)
                out_b, scores_b = to_patch_ids(runner_b.infer(feed), getattr(runner_b, "last_scores", None),
                                               spec)
                scores, cand = _tie_scores(runner_a, runner_b, scores_a, scores_b)
                case = compare_outputs(out_a, out_b, scores, tol, cand)
                cases.append({"inputs": set_name, "batch": int(bs), **case})
    return {
        "a": runner_a.name,
        "b": runner_b.name,
        "tolerance": {k: (v if np.isfinite(v) else None) for k, v in asdict(tol).items()},
        "cases": cases,
        "passed": all(c["passed"] for c in cases),
    }


def _tie_scores(runner_a, runner_b, scores_a, scores_b):
    """(reference scores, candidate scores on the same scale or None) for the tie analysis: the
    reference's when it records them, else the candidate's; the candidate's own only when both
    rank with the same score formula (folded scores have another scale than the paper's)."""
    scores_a, scores_b = scores_a or None, scores_b or None
    mode_a, mode_b = getattr(runner_a, "score_mode", None), getattr(runner_b, "score_mode", None)
    same_scale = mode_a is not None and mode_a == mode_b
    if scores_b is None:
        return scores_a, None
    return scores_b, scores_a if same_scale and scores_a is not None else None


def labels_from_folders(files: list[str], classes: list[str] | None) -> np.ndarray | None:
    """Ground-truth labels for an ImageFolder layout (DIR/<class name>/image.png) when every
    image's parent folder is one of the model's class names; None otherwise."""
    if not classes or not files:
        return None
    index = {name: i for i, name in enumerate(classes)}
    labels = [index.get(Path(f).parent.name) for f in files]
    if any(label is None for label in labels):
        return None
    return np.asarray(labels, dtype=np.int64)


def _run_chunked(runner, images: np.ndarray, bs: int) -> tuple[dict, list | None]:
    """All images through `runner` in batches of `bs`: concatenated outputs (and the reference
    scores, per idle layer, when the runner records them)."""
    outs, scores = [], []
    for i in range(0, len(images), bs):
        outs.append(runner.infer({"images": images[i:i + bs]}))
        recorded = getattr(runner, "last_scores", None)
        if recorded:
            scores.append(recorded)
    merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    merged_scores = None
    if scores and len(scores) == len(outs):
        merged_scores = [np.concatenate([s[li] for s in scores]) for li in range(len(scores[0]))]
    return merged, merged_scores


def selection_overlap(out_a: dict, out_b: dict) -> dict[str, float]:
    """Per idle layer: mean fraction of the reference's kept tokens that the candidate kept too
    (|A∩B| / K). Softer than set agreement: one swapped token of 137 costs 0.7%, not 100%."""
    result = {}
    for key in out_b:
        if key.startswith(SELECTION_PREFIX) and key in out_a:
            sa, sb = out_a[key], out_b[key]
            common = [len(set(a.tolist()) & set(b.tolist())) / max(len(b), 1)
                      for a, b in zip(sa, sb, strict=True)]
            result[key[len(SELECTION_PREFIX):]] = float(np.mean(common))
    return result


def compare_on_images(candidate, reference, images: np.ndarray, batch_sizes: list[int], tol: Tolerances,
                      labels: np.ndarray | None = None, set_name: str = "images", spec=None) -> list[dict]:
    """One case per batch size over *all* images (run in chunks of that size); with labels,
    the top-1 accuracy of both runners and the drop; `spec` as compare_runners."""
    cases = []
    for bs in batch_sizes:
        out_a, scores_a = to_patch_ids(*_run_chunked(candidate, images, bs), spec)
        out_b, scores_b = to_patch_ids(*_run_chunked(reference, images, bs), spec)
        scores, cand = _tie_scores(candidate, reference, scores_a, scores_b)
        case = {"inputs": set_name, "batch": int(bs), "images": int(len(images)),
                **compare_outputs(out_a, out_b, scores, tol, cand)}
        overlap = selection_overlap(out_a, out_b)
        if overlap:
            case["selection_overlap_per_layer"] = overlap
            case["selection_overlap"] = float(np.mean(list(overlap.values())))
        if labels is not None:
            acc_a = float(np.mean(out_a["logits"].argmax(1) == labels))
            acc_b = float(np.mean(out_b["logits"].argmax(1) == labels))
            case["accuracy"] = {"candidate": acc_a, "reference": acc_b, "drop": acc_b - acc_a}
        cases.append(case)
    return cases


