"""Export the network to ONNX, check the graph against torch, optionally build the TensorRT engine.

The graph takes ``ir`` and ``vis_y`` (1 x 1 x H x W float32 in [0, 1]; with a head that reads colour also
``chroma``, 1 x H x W x 2 uint8 Cr, Cb) and returns ``fused`` (1 x 1 x H x W)
and ``labels`` (1 x H x W uint8 class ids, argmax inside the graph); the checkpoint metadata (class names, palette,
...) is stored in the model's ``ivf_ros`` metadata property. ``--dynamic`` leaves H and W free (multiples of 4).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..backends import export_onnx, make_backend, reads_chroma
from ..checkpoint import load_checkpoint
from ..model import chroma_planes
from .bench import parse_sizes

TOLERANCE = 1e-3


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", help="checkpoint to export (default: the shipped one)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    p.add_argument("--size", default="640x480", help="WIDTHxHEIGHT to export (and check) at (default: 640x480)")
    p.add_argument("--dynamic", action="store_true", help="free height and width (multiples of 4)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--tensorrt", action="store_true", help="also build and cache the TensorRT engine (needs a GPU)")
    p.add_argument("--half", action="store_true", help="TensorRT engine in half precision")
    p.add_argument("-o", "--output", help="output file (default: ./<checkpoint name>_<WxH|dynamic>.onnx)")


def relative_error(result: np.ndarray, reference: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(result - reference).max() / max(float(np.abs(reference).max()), 1e-12))


def label_errors(labels: np.ndarray, logits: np.ndarray, tolerance: float = TOLERANCE) -> float:
    """Fraction of pixels whose label differs from the argmax of ``logits`` (C x H x W) by more than a tie: the
    logit of the given label is below the best logit by more than ``tolerance`` relative."""
    chosen = np.take_along_axis(logits, labels[None].astype(np.int64), 0)[0]
    gap = logits.max(0) - chosen
    return float(np.mean(gap > tolerance * max(float(np.abs(logits).max()), 1e-12)))


def check_against_torch(model: torch.nn.Module, path: Path, width: int, height: int) -> dict[str, float]:
    """Relative error of the ONNX graph's fused image, and its fraction of wrong labels, against the torch
    model (float32, CPU) on the same random inputs."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(1, 1, height, width, generator=generator) for _ in range(2)]
    if reads_chroma(model):
        inputs.append(torch.randint(0, 256, (1, height, width, 2), generator=generator, dtype=torch.uint8))
    with torch.inference_mode():
        chroma = [chroma_planes(t) for t in inputs[2:]]
        fused, logits = model.eval().float().cpu()(*inputs[:2], *chroma)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_fused, onnx_labels = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    return {"fused": relative_error(onnx_fused, fused.numpy()),
            "labels": label_errors(onnx_labels[0], logits[0].numpy())}


def run(args) -> int:
    import onnx

    (width, height), = parse_sizes(args.size)
    model, metadata = load_checkpoint(args.checkpoint)
    stem = Path(args.checkpoint).stem if args.checkpoint else "ivf_student"
    path = Path(args.output or f"{stem}_{'dynamic' if args.dynamic else f'{width}x{height}'}.onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, str(path), height, width, dynamic=args.dynamic, opset=args.opset)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    graph.metadata_props.add(key="ivf_ros", value=json.dumps(metadata))
    onnx.save(graph, str(path))
    errors = check_against_torch(model, path, width, height)
    ok = errors["fused"] <= TOLERANCE and errors["labels"] == 0.0
    print(f"wrote {path} ({'dynamic' if args.dynamic else f'{width}x{height}'}, opset {args.opset}); "
          f"vs torch at {width}x{height}: fused relative error {errors['fused']:.1e}, "
          f"labels wrong beyond ties {errors['labels']:.1e} ({'ok' if ok else 'MISMATCH'})")
    if args.tensorrt:
        backend = make_backend("tensorrt", None, "cuda", half=args.half, onnx_path=path)
        backend(np.zeros((height, width), np.float32), np.zeros((height, width), np.float32))
        print(f"TensorRT engine cached under {backend.engine_cache}")
    return 0 if ok else 1
