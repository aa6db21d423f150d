"""The ROS-free per-pair pipeline: IR normalise -> register IR to visible -> student -> colour restore.

Used unchanged by the node, ``ivf fuse``, ``ivf eval``, bag evaluation and the benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backends import make_backend
from .checkpoint import load_checkpoint
from .imageops import IRNormalizer, colorize_labels, merge_luminance, prepare_ir, split_luminance
from .registration import Registration


@dataclass
class FusionResult:
    fused: np.ndarray  # H x W x 3 BGR uint8 (colour visible) or H x W uint8 (gray visible)
    labels: np.ndarray  # H x W uint8 class ids
    ir_registered: np.ndarray  # H x W float32 in [0, 1], the IR the network saw


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` / ``cuda:N`` fail clearly when it is not."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' requested but CUDA is not available")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not '{name}'")


class FusionPipeline:
    """Fuse and segment one IR/visible pair at a time.

    ``ir`` may be uint8, uint16 or float32 (any size; it is registered to the visible frame); ``vis`` is gray or
    BGR uint8. Outputs have the visible image's size.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        half: bool = False,
        ir_normalizer: IRNormalizer | None = None,
        registration: Registration | None = None,
        backend: str = "torch",
        onnx_path: str | Path | None = None,
        cuda_graphs: bool = False,
        head_precision: str = "auto",
    ):
        """``backend``: torch, compile, onnxruntime or tensorrt (see ``ivf_ros.backends``); ``onnx_path``: an
        ``ivf export`` file for the ONNX backends (default: export the checkpoint per input size in memory);
        ``head_precision``: auto, float32 or bfloat16 (``ivf_ros.backends.resolve_head_dtype``)."""
        self.device = resolve_device(device)
        self.half = bool(half) and self.device.type == "cuda"
        model, self.metadata = load_checkpoint(checkpoint, self.device)
        self.backend = make_backend(backend, model, self.device, self.half, onnx_path, cuda_graphs,
                                    head_precision=head_precision)
        self.head_bf16 = getattr(self.backend, "head_dtype", None) == torch.bfloat16  # the labels' precision
        self.model = model  # the checkpoint's network (BatchNorm folded in place by the torch backends)
        self.classes: list[str] = list(self.metadata["classes"])
        self.palette: list[list[int]] = [list(c) for c in self.metadata["palette"]]
        self.ir_normalizer = ir_normalizer or IRNormalizer()
        self.registration = registration or Registration()

    @property
    def precision(self) -> str:
        """The network's precision in words: float32, float16 or "bfloat16 head" (fusion in float32)."""
        return "float16" if self.half else "bfloat16 head" if self.head_bf16 else "float32"

    def infer(self, ir01: np.ndarray, vis_y: np.ndarray,
              chroma: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Network only: registered IR and visible luminance in [0, 1] (and the visible chroma, read by heads
        with ``seg_chroma``) -> (fused luminance, class ids)."""
        return self.backend(ir01, vis_y, chroma)

    def prepare(self, ir: np.ndarray, vis: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """What the network sees: (registered IR, visible luminance) float32 in [0, 1], and the visible chroma."""
        if ir.size == 0 or vis.size == 0:
            raise ValueError("empty image")
        vis_y, chroma = split_luminance(vis)
        return self.registration.apply(prepare_ir(ir, self.ir_normalizer), vis_y.shape), vis_y, chroma

    def __call__(self, ir: np.ndarray, vis: np.ndarray) -> FusionResult:
        ir01, vis_y, chroma = self.prepare(ir, vis)
        fused_y, labels = self.infer(ir01, vis_y, chroma)
        return FusionResult(merge_luminance(fused_y, chroma), labels, ir01)

    def overlay(self, result: FusionResult) -> np.ndarray:
        """BGR overlay of the label colours on the fused image."""
        return colorize_labels(result.labels, self.palette, result.fused)
