"""A detector as one ONNX graph, images in, detections out (decoding, NMS, top-k), checked against PyTorch.

The graph follows the definition of :mod:`frugalvision.detect.postprocess` exactly: the model's decoded
predictions, then ONNX ``NonMaxSuppression`` per image and class (strict score threshold ``conf_thres``, strict IoU
``iou_thres``), then per image the ``max_det`` highest scores over all classes (``TopK``; equal scores: lower
``class * A + anchor`` first). ``conf_thres``, ``iou_thres`` and ``max_det`` are constants of the graph: export
again to change them.

Graph, opset 17 or later:

* input ``images`` ``(B, 3, H, W)`` float32 in ``[0, 1]`` (``B``, ``H``, ``W`` dynamic with ``dynamic=True``, ``B``
  only with ``dynamic="batch"``);
* outputs, padded to ``max_det`` rows per image, detections first and sorted by descending score:
  ``boxes`` ``(B, max_det, 4)`` float32 xyxy in input pixels, ``scores`` ``(B, max_det)`` float32,
  ``labels`` ``(B, max_det)`` int64 class indices, ``anchors`` ``(B, max_det)`` int64 (the anchor point of each
  detection, for a mask head), ``num_dets`` ``(B,)`` int64. Padding rows hold boxes and scores 0, labels and
  anchors -1. Row ``i`` of image ``b`` is a detection iff ``i < num_dets[b]``.

Fixed-size outputs keep every shape known to downstream runtimes and batch slicing trivial; there is no
per-class cap, so a per-class ``NonMaxSuppression`` limit of ``max_det`` changes nothing (the top ``max_det`` of all
classes never holds more than ``max_det`` of one class, and greedy NMS selects a class's boxes in score order).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .._deps import require
from ..errors import ConfigError, DataError
from ..export.onnx import ExportError, OrtRunner, _staged, session_options
from .postprocess import _check_thresholds, postprocess

__all__ = ["OUTPUT_NAMES", "DetectorExportResult", "OrtDetector", "export_detector_onnx"]

log = logging.getLogger(__name__)

#: The graph's outputs, in order.
OUTPUT_NAMES = ("boxes", "scores", "labels", "anchors", "num_dets")
_RAW = ("pred", "raw_boxes", "raw_scores", "raw_classes")


@dataclass
class DetectorExportResult:
    """Where the detector went and how closely onnxruntime reproduces PyTorch + :func:`postprocess`."""

    path: Path
    checked_batch_sizes: tuple[int, ...] = ()
    checked_image_sizes: tuple[tuple[int, int], ...] = ()  #: ``(H, W)`` of each checked batch
    num_detections: int = 0  #: detections compared over all checked batches
    max_box_err: float | None = None  #: pixels, over the compared detections
    max_score_err: float | None = None
    max_raw_box_err: float | None = None  #: the model's decoded boxes before NMS, pixels
    max_raw_score_err: float | None = None  #: the model's scores before NMS
    #: detections present on one side only because a score or IoU within float rounding of a threshold fell on
    #: the other side of it in onnxruntime (the graph's own predictions give exactly its detections)
    threshold_flips: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  #: the constants baked into the graph


class _Decode(nn.Module):
    """The model, then its predictions as ``NonMaxSuppression`` takes them.

    Outputs: the predictions, boxes ``(B, A, 4)``, scores ``(B, G, A)`` (``G`` = classes, or 1 with the best
    class's score when class-agnostic) and, when class-agnostic, the best class ``(B, A)``.
    """

    def __init__(self, model: nn.Module, multi_label: bool, class_agnostic: bool) -> None:
        super().__init__()
        self.model, self.multi_label, self.class_agnostic = model, multi_label, class_agnostic

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pred = self.model(images)
        boxes, scores = pred[..., :4], pred[..., 4:]
        if self.class_agnostic:
            best = scores.argmax(-1)
            return pred, boxes, scores.amax(-1).unsqueeze(1), best
        if not self.multi_label:
            best = scores.argmax(-1, keepdim=True)  # the first of equal maxima, as in postprocess
            keep = torch.arange(scores.shape[-1], device=scores.device) == best
            scores = torch.where(keep, scores, torch.full_like(scores, -1.0))
        return pred, boxes, scores.transpose(1, 2)


def _append_nms(proto: Any, conf_thres: float, iou_thres: float, max_det: int, class_agnostic: bool) -> None:
    """Replace the decode graph's outputs with NMS + top-k detections (graph surgery with ``onnx.helper``)."""
    onnx = require("onnx", "ONNX export")
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph

    def const(name: str, value: Any, dtype: Any) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"nms/{name}"))
        return f"nms/{name}"

    def node(op: str, inputs: Sequence[str], out: str, **attrs: Any) -> str:
        g.node.append(helper.make_node(op, list(inputs), [out], name=f"nms/{out}", **attrs))
        return out

    max_out = const("max_out", [max_det], np.int64)
    iou = const("iou_thres", [iou_thres], np.float32)
    conf = const("conf_thres", [conf_thres], np.float32)
    pad_value = const("pad_value", -1.0, np.float32)
    # NonMaxSuppression reads boxes as [y1, x1, y2, x2]; IoU is the same for [x1, y1, x2, y2]
    sel = node("NonMaxSuppression", ["raw_boxes", "raw_scores", max_out, iou, conf], "nms/selected",
               center_point_box=0)
    sel_scores = node("GatherND", ["raw_scores", sel], "nms/selected_scores")
    fill = node("Expand", [pad_value, node("Shape", ["raw_scores"], "nms/scores_shape")], "nms/fill")
    dense = node("ScatterND", [fill, sel, sel_scores], "nms/dense")  # kept scores, -1 elsewhere
    flat = node("Reshape", [dense, const("flat_shape", [0, -1], np.int64)], "nms/flat")  # (B, G * A)
    # pad with max_det columns of -1 so that TopK always has max_det columns to take
    padded = node("Pad", [flat, const("pads", [0, 0, 0, max_det], np.int64), pad_value], "nms/padded")
    g.node.append(helper.make_node("TopK", [padded, max_out], ["nms/top_scores", "nms/top_index"], axis=1,
                                   largest=1, sorted=1, name="nms/TopK"))
    valid = node("Greater", ["nms/top_scores", conf], "nms/valid")
    num_anchors = node("Gather", [node("Shape", ["raw_boxes"], "nms/boxes_shape"), const("one", 1, np.int64)],
                       "nms/num_anchors")
    anchor = node("Mod", ["nms/top_index", num_anchors], "nms/anchor")
    if class_agnostic:
        label = node("GatherElements", ["raw_classes", anchor], "nms/label", axis=1)
    else:
        label = node("Div", ["nms/top_index", num_anchors], "nms/label")
    boxes = node("GatherND", ["raw_boxes", node("Unsqueeze", [anchor, const("last", [-1], np.int64)], "nms/idx")],
                 "nms/boxes", batch_dims=1)
    zero, minus_one = const("zero", 0.0, np.float32), const("minus_one", -1, np.int64)
    node("Where", [node("Unsqueeze", [valid, "nms/last"], "nms/valid4"), boxes, zero], "boxes")
    node("Where", [valid, "nms/top_scores", zero], "scores")
    node("Where", [valid, label, minus_one], "labels")
    node("Where", [valid, anchor, minus_one], "anchors")
    node("ReduceSum", [node("Cast", [valid], "nms/valid_int", to=TensorProto.INT64), const("axis1", [1], np.int64)],
         "num_dets", keepdims=0)
    del g.output[:]
    g.output.extend([
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", max_det, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", max_det]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", max_det]),
        helper.make_tensor_value_info("anchors", TensorProto.INT64, ["batch", max_det]),
        helper.make_tensor_value_info("num_dets", TensorProto.INT64, ["batch"]),
    ])
    onnx.checker.check_model(proto)


def _to_dets(outs: Sequence[np.ndarray]) -> list[dict[str, torch.Tensor]]:
    boxes, scores, labels, anchors, num = outs
    return [{"boxes": torch.from_numpy(boxes[i, :n].copy()), "scores": torch.from_numpy(scores[i, :n].copy()),
             "labels": torch.from_numpy(labels[i, :n].copy()), "anchors": torch.from_numpy(anchors[i, :n].copy())}
            for i, n in enumerate(int(v) for v in num)]


def _keys(det: dict[str, torch.Tensor]) -> dict[tuple[int, int], int]:
    return {(int(c), int(a)): i for i, (c, a) in enumerate(zip(det["labels"], det["anchors"], strict=True))}


class OrtDetector:
    """Run a graph of :func:`export_detector_onnx` with onnxruntime; detections as :func:`postprocess` gives them.

    Args:
        path: The ``.onnx`` file.
        threads: Intra-op threads (``torch.get_num_threads()`` when omitted).
        device: ``cpu`` or ``cuda`` (when onnxruntime has CUDA).

    Attributes:
        settings: The graph's constants: ``conf_thres``, ``iou_thres``, ``max_det``, ``multi_label``,
            ``class_agnostic``.

    Example:
        >>> import tempfile, pathlib
        >>> class Toy(nn.Module):  # one anchor per 8x8 cell, box = the cell, 2 class scores
        ...     def forward(self, x):
        ...         b, _, h, w = x.shape
        ...         cells = nn.functional.avg_pool2d(x, 8)  # (B, 3, h/8, w/8)
        ...         ys, xs = torch.meshgrid(torch.arange(h // 8), torch.arange(w // 8), indexing="ij")
        ...         xy = torch.stack((xs, ys, xs + 1, ys + 1), -1).reshape(1, -1, 4).float() * 8
        ...         return torch.cat((xy.expand(b, -1, 4), cells[:, :2].flatten(2).transpose(1, 2)), -1)
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "toy.onnx"
        >>> res = export_detector_onnx(Toy(), p, img_size=(32, 32), max_det=5)
        >>> res.checked_batch_sizes, res.threshold_flips
        ((1, 3, 2), 0)
        >>> img = torch.zeros(1, 3, 32, 32)
        >>> img[0, 0, 8:16, 16:24] = 1.0  # cell (row 1, col 2): class 0 scores 1
        >>> det = OrtDetector(p)(img)[0]
        >>> det["boxes"].tolist(), det["labels"].tolist(), det["anchors"].tolist()
        ([[16.0, 8.0, 24.0, 16.0]], [0], [6])
    """

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "cpu") -> None:
        self.path = Path(path)
        self.runner = OrtRunner(self.path, threads=threads, device=device)
        if self.runner.input_names != ["images"] or tuple(self.runner.output_names) != OUTPUT_NAMES:
            raise ExportError(f"{self.path} is not a detector graph of export_detector_onnx (inputs "
                              f"{self.runner.input_names}, outputs {self.runner.output_names}; expected ['images'] "
                              f"and {list(OUTPUT_NAMES)}); export it with export_detector_onnx")
        meta = self.runner.session.get_modelmeta().custom_metadata_map
        self.settings: dict[str, Any] = {k: _parse(v) for k, v in meta.items()}

    def __call__(self, images: np.ndarray | torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections of each image of a ``(B, 3, H, W)`` (or ``(3, H, W)``) float batch in ``[0, 1]``.

        A uint8 batch is divided by 255 first.
        """
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise DataError(f"OrtDetector expects images (batch, 3, height, width), got shape {x.shape}")
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
        return _to_dets(self.runner(np.ascontiguousarray(x)))


def _parse(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


@torch.no_grad()
def export_detector_onnx(
    model: nn.Module,
    path: str | Path,
    img_size: tuple[int, int] = (320, 320),
    conf_thres: float = 0.25,
    iou_thres: float = 0.65,
    max_det: int = 100,
    dynamic: bool | Literal["batch"] = True,
    opset: int = 17,
    check: bool = True,
    multi_label: bool = True,
    class_agnostic: bool = False,
    check_images: torch.Tensor | None = None,
    box_atol: float | None = None,
    score_atol: float = 1e-4,
) -> DetectorExportResult:
    """Export a detector with its post-processing as one ONNX graph (format in this module's docstring).

    The model (eval mode, CPU, exported as is: fuse or reparameterize it first) must map images ``(B, 3, H, W)``
    in ``[0, 1]`` to decoded predictions ``(B, A, 4 + C)``: xyxy boxes in input pixels, then class scores in
    ``[0, 1]``. It is traced by the TorchScript exporter; ``NonMaxSuppression`` and the top-k are appended to its
    graph. The file is written atomically, after the check.

    The check runs onnxruntime on a batch of 1 and one of 3 at ``img_size``, a batch of 2 at ``img_size + (32, 64)``
    when ``dynamic=True``, and ``check_images`` when given (random images otherwise: pass real ones to exercise NMS on a
    trained detector), and compares with :func:`postprocess` of the PyTorch predictions: the same detections
    (matched by class and anchor), boxes within ``box_atol`` pixels, scores within ``score_atol``. A detection on
    one side only is accepted only when the graph's own predictions (within the tolerances of PyTorch's) give
    exactly the graph's detections: a score or IoU within float rounding of a threshold (``threshold_flips``).

    Args:
        model: The detector.
        path: Output ``.onnx`` file.
        img_size: ``(H, W)`` traced and checked.
        conf_thres: Score threshold (strictly greater), a graph constant.
        iou_thres: NMS IoU threshold (strictly greater suppresses), a graph constant.
        max_det: Detections per image (the outputs' row count), a graph constant.
        dynamic: ``True``: dynamic batch, height and width; ``"batch"``: dynamic batch only (for a model whose
            anchors are fixed at trace time); ``False``: a fixed ``(1, 3, H, W)`` input.
        opset: ONNX opset (17 or later).
        check: Compare onnxruntime with PyTorch + :func:`postprocess`.
        multi_label: Every class above ``conf_thres`` of an anchor is a candidate (as in :func:`postprocess`).
        class_agnostic: One NMS over all classes (best class per anchor).
        check_images: Extra ``(N, 3, H, W)`` images for the check (any ``H``, ``W`` when ``dynamic=True``; ``N`` 1
            when ``dynamic=False``).
        box_atol: Tolerance on boxes, in pixels; by default ``1e-4`` of the larger image side (0.0128 px at 128 px,
            0.064 px at 640 px: float32 rounding of a trained detector's boxes reaches ~1e-5 of the image size).
        score_atol: Tolerance on scores.

    Returns:
        The path, the checked batch sizes and image sizes, and the measured errors.

    Raises:
        ExportError: If the export fails or the graph disagrees with PyTorch.
        ConfigError: If a threshold is out of range.
    """
    onnx = require("onnx", "ONNX export")
    _check_thresholds(conf_thres, iou_thres, max_det)
    if opset < 17:
        raise ExportError(f"export_detector_onnx needs opset 17 or later, got {opset}")
    if dynamic not in (True, False, "batch"):
        raise ConfigError(f"dynamic must be true, false or 'batch', got {dynamic!r}")
    path = Path(path)
    height, width = int(img_size[0]), int(img_size[1])
    settings = {"conf_thres": float(conf_thres), "iou_thres": float(iou_thres), "max_det": int(max_det),
                "multi_label": bool(multi_label), "class_agnostic": bool(class_agnostic)}
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model = model.eval().cpu()
    wrapper = _Decode(model, multi_label, class_agnostic).eval()
    example = torch.rand(2 if dynamic else 1, 3, height, width, generator=torch.Generator().manual_seed(0))
    try:
        pred = model(example)
        if not isinstance(pred, torch.Tensor) or pred.ndim != 3 or pred.shape[-1] < 5:
            raise ExportError(f"the model must return predictions (batch, anchors, 4 + classes) in eval mode, got "
                              f"{tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__}")
        outputs = list(_RAW if class_agnostic else _RAW[:3])
        axes = None
        if dynamic:
            image_axes = {0: "batch", 2: "height", 3: "width"} if dynamic is True else {0: "batch"}
            axes = {"images": image_axes, "pred": {0: "batch", 1: "anchors"},
                    "raw_boxes": {0: "batch", 1: "anchors"}, "raw_scores": {0: "batch", 2: "anchors"},
                    "raw_classes": {0: "batch", 1: "anchors"}}
            axes = {k: v for k, v in axes.items() if k == "images" or k in outputs}
        with _staged(path) as tmp:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, opset_version=opset,
                                      input_names=["images"], output_names=outputs, dynamic_axes=axes,
                                      do_constant_folding=True)
            except Exception as exc:  # the exporter raises many types
                raise ExportError(f"ONNX export of {type(model).__name__} failed: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0][:300]}") from None
            proto = onnx.load(str(tmp))
            decode = proto.SerializeToString()
            _append_nms(proto, conf_thres, iou_thres, int(max_det), class_agnostic)
            onnx.helper.set_model_props(proto, {k: str(v).lower() if isinstance(v, bool) else str(v)
                                                for k, v in settings.items()})
            onnx.save(proto, str(tmp))
            result = DetectorExportResult(path, settings=settings)
            if check:
                sizes = [(1, height, width), (3, height, width)] if dynamic else [(1, height, width)]
                if dynamic is True:
                    sizes.append((2, height + 32, width + 64))
                tol = box_atol if box_atol is not None else 1e-4 * max(height, width)
                _check(model, tmp, decode, sizes, check_images, settings, tol, score_atol, result)
    finally:
        model.to(device).train(was_training)
    return result


def _check(model: nn.Module, path: Path, decode: bytes, sizes: list[tuple[int, int, int]],
           check_images: torch.Tensor | None, settings: dict[str, Any], box_atol: float, score_atol: float,
           result: DetectorExportResult) -> None:
    ort = require("onnxruntime", "checking ONNX models")
    runner = OrtDetector(path, threads=torch.get_num_threads())
    raw_sess = ort.InferenceSession(decode, session_options(ort, torch.get_num_threads()),
                                    providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(s, generator=g) for s in [(n, 3, h, w) for n, h, w in sizes]]
    if check_images is not None:
        batches.append(check_images.detach().cpu().float())
    nms_args = {k: settings[k] for k in ("conf_thres", "iou_thres", "max_det", "multi_label", "class_agnostic")}
    box_err = score_err = raw_box_err = raw_score_err = 0.0
    count = flips = 0
    for x in batches:
        what = f"a batch of {x.shape[0]} at {x.shape[2]}x{x.shape[3]}"
        hint = "dynamic='batch'" if tuple(x.shape[2:]) != tuple(sizes[0][1:]) else "dynamic=False"
        try:
            pred = model(x).float()
        except Exception as exc:  # the model's own errors
            raise ExportError(f"the PyTorch model fails on {what} ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:200]}); export it with {hint}") from None
        try:
            got = runner(x.numpy())
            ort_pred = torch.from_numpy(raw_sess.run(["pred"], {"images": x.numpy()})[0]).float()
        except Exception as exc:  # onnxruntime's own exception types
            raise ExportError(f"the ONNX graph fails on {what}: {str(exc).strip().splitlines()[0][:300]} (a model "
                              f"whose anchors or shapes are fixed at trace time needs {hint})") from None
        if ort_pred.shape != pred.shape:
            raise ExportError(f"the exported model gives predictions of shape {tuple(ort_pred.shape)} on {what}, "
                              f"PyTorch {tuple(pred.shape)}; the trace baked a shape in (export with {hint})")
        diff = (ort_pred - pred).abs()
        raw_box_err = max(raw_box_err, float(diff[..., :4].max()))
        raw_score_err = max(raw_score_err, float(diff[..., 4:].max()))
        if raw_box_err > box_atol or raw_score_err > score_atol:
            raise ExportError(f"the exported model's predictions differ from PyTorch on {what} by up to "
                              f"{raw_box_err:.3g} px (boxes) and {raw_score_err:.3g} (scores); tolerances "
                              f"{box_atol} and {score_atol}")
        ref = postprocess(pred, **nms_args)
        own = None
        for i, (r, o) in enumerate(zip(ref, got, strict=True)):
            rk, ok = _keys(r), _keys(o)
            if rk.keys() != ok.keys():
                own = own if own is not None else postprocess(ort_pred, **nms_args)
                if _keys(own[i]).keys() != ok.keys():
                    raise ExportError(f"the ONNX graph's detections differ from postprocess on image {i} of {what}: "
                                      f"{len(ok)} vs {len(rk)} detections, {len(ok.keys() ^ rk.keys())} not shared; "
                                      "the graph does not follow postprocess's definition")
                flips += len(ok.keys() ^ rk.keys())
            both = [(rk[k], ok[k]) for k in rk.keys() & ok.keys()]
            if both:
                ri, oi = (torch.tensor(v) for v in zip(*both, strict=True))
                box_err = max(box_err, float((r["boxes"][ri].float() - o["boxes"][oi]).abs().max()))
                score_err = max(score_err, float((r["scores"][ri].float() - o["scores"][oi]).abs().max()))
                count += len(both)
            if (o["scores"][1:] > o["scores"][:-1]).any():
                raise ExportError(f"the ONNX graph's detections of image {i} of {what} are not sorted by score")
        if box_err > box_atol or score_err > score_atol:
            raise ExportError(f"the ONNX graph's detections differ from postprocess on {what} by up to "
                              f"{box_err:.3g} px and {score_err:.3g} in score; tolerances {box_atol} and {score_atol}")
    if count == 0:
        log.warning("the ONNX check of %s compared no detections (no score above conf_thres=%s); pass check_images "
                    "with objects to check NMS", path.name, settings["conf_thres"])
    result.checked_batch_sizes = tuple(int(x.shape[0]) for x in batches)
    result.checked_image_sizes = tuple((int(x.shape[2]), int(x.shape[3])) for x in batches)
    result.num_detections, result.threshold_flips = count, flips
    result.max_box_err, result.max_score_err = box_err, score_err
    result.max_raw_box_err, result.max_raw_score_err = raw_box_err, raw_score_err
