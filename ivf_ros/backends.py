"""Network-only runners: one small interface over torch eager, torch.compile, ONNX Runtime and TensorRT.

A backend is called as ``backend(ir01, vis_y[, chroma])`` with two H x W float32 images in [0, 1] (registered IR,
visible luminance) and optionally the visible chroma (H x W x 2 uint8 Cr, Cb, as ``split_luminance`` gives; read
by heads with ``seg_chroma``, neutral when None) and returns ``(fused_y, labels)``: H x W float32 fused luminance
and H x W uint8 class ids (``None`` for networks without a segmentation head, such as the SAGE reference). Any
network whose forward takes ``(ir, vis_y)`` as N x 1 x H x W tensors and returns ``fused`` or ``(fused, logits)``
can be run.

- ``torch``: BatchNorm folded, channels-last, inference mode; on CUDA optional half precision, pinned host
  buffers, non-blocking copies, device buffers preallocated per input size and optional CUDA graphs. On a CPU
  with native bfloat16 (oneDNN on AMX / AVX512-BF16) the segmentation head runs in bfloat16 by default
  (``head_precision``): 2-3x faster here, the same labels up to about 1 pixel in 1,000, the fused image
  unchanged (the fusion path stays float32).
- ``compile``: the same module through ``torch.compile`` (Inductor, frozen weights), compiled once per size.
- ``onnxruntime``: an exported ONNX graph (a file from ``ivf export`` or exported in memory per input size) on
  the CPU, or the CUDA execution provider when the device is CUDA.
- ``tensorrt``: ONNX Runtime's TensorRT execution provider; engines are cached on disk under a directory keyed
  by GPU name, TensorRT version and input size, so each is built once.

On a CPU shared with other processes, start the process with ``OMP_WAIT_POLICY=PASSIVE`` (it must be set before
torch is imported): with the default spin-waiting, two OpenMP threads on two busy cores made a 32-channel convolution
20x slower here. ONNX Runtime's pool is set not to spin for the same reason. The ``ivf`` and ``fusion_node`` entry
points make glibc's malloc keep freed memory for reuse (``keep_freed_memory``, process-wide, so a library user
decides it).
"""
from __future__ import annotations

import copy
import ctypes
import io
import os
import platform
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .model import chroma_planes

BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")
ONNX_BACKENDS = BACKENDS[2:]  # run exported ONNX (and so can take an onnx_path)
INPUT_NAMES = ("ir", "vis_y")
CHROMA_INPUT = "chroma"  # 1 x H x W x 2 uint8, an input of exported graphs whose network reads the chroma
POOL_FACTOR = 4  # model.grid_average pools to ceil(size / 4): the only adaptive pooling exported
DEFAULT_ENGINE_CACHE = Path(os.environ.get("IVF_ENGINE_CACHE", Path.home() / ".cache" / "ivf_ros" / "tensorrt"))


HEAD_PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (x86 AVX512-BF16 or AMX) for oneDNN's convolutions; oneDNN also
    runs bfloat16 on plain AVX-512, emulated, and slower than float32."""
    try:
        return torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported()
                                                         or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_head_dtype(head_precision: str, device: torch.device, backend: str = "torch") -> torch.dtype:
    """The dtype the segmentation head runs in: ``auto`` is bfloat16 for the eager torch backend on a CPU with
    native bfloat16, else float32; ``bfloat16`` is refused elsewhere (emulated it is slower). One-line errors."""
    if head_precision not in HEAD_PRECISIONS:
        raise ValueError(f"head_precision must be one of {', '.join(HEAD_PRECISIONS)}, not '{head_precision}'")
    eligible = backend == "torch" and torch.device(device).type == "cpu" and native_bf16()
    if head_precision == "bfloat16" and not eligible:
        raise ValueError("head_precision bfloat16 needs the torch backend on a CPU with native bfloat16 "
                         "(AMX or AVX512-BF16)")
    return torch.bfloat16 if head_precision != "float32" and eligible else torch.float32


class _WithLabels(nn.Module):
    """Wraps a network to return ``(fused,)`` or ``(fused, labels)``: uint8 class ids instead of logits.

    Networks with ``fuse_and_label`` (the student) give their labels directly, except in exported graphs; there
    the argmax of the upsampled logits is taken over the channel axis inside the graph (measured faster than NumPy
    on the logits, and 16x less data to hand back). Otherwise it is taken channel-last in torch (~10x faster on the
    CPU for channels-last logits).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, ir: torch.Tensor, vis_y: torch.Tensor, chroma: torch.Tensor | None = None):
        """``chroma``: N x H x W x 2 uint8 (Cr, Cb), given only to networks that read it."""
        exporting = torch.onnx.is_in_onnx_export()
        extra = () if chroma is None else (chroma_planes(chroma, ir.dtype),)
        if hasattr(self.net, "fuse_and_label") and not exporting:
            fused, labels = self.net.fuse_and_label(ir, vis_y, *extra)
            return fused.float(), labels.to(torch.uint8)
        out = self.net(ir, vis_y, *extra)
        if isinstance(out, torch.Tensor):
            return (out.float(),)
        fused, logits = out
        labels = logits.argmax(1) if exporting else logits.permute(0, 2, 3, 1).argmax(-1)
        return fused.float(), labels.to(torch.uint8)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (mmap threshold 32 MB, trim threshold 256 MB) instead of
    returning it to the system; returns whether it could. With the default adaptive thresholds a 640x480 pair's
    large temporaries came back as fresh pages: about 5,500 page faults and 10-15 ms of kernel time per pair
    here, about 30 faults after. The process keeps at most its peak heap; other C libraries are unaffected."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the libc already loaded into this process
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 256 << 20))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def reads_chroma(model: nn.Module) -> bool:
    """Whether a network's labels depend on the visible chroma (a head with ``seg_chroma``)."""
    return bool(getattr(model, "seg_chroma", 0))


def prepare_module(model: nn.Module) -> nn.Module:
    """Inference form of a network: eval mode, BatchNorm folded into convolutions when the network offers it."""
    model = model.eval()
    if hasattr(model, "fold_batchnorm"):
        model = model.fold_batchnorm()
    return model


class TorchBackend:
    """Runs a torch module eagerly (or through ``torch.compile``) on the CPU or a CUDA device."""

    def __init__(self, model: nn.Module, device: torch.device, half: bool = False, compile: bool = False,
                 cuda_graphs: bool = False, head_dtype: torch.dtype = torch.float32):
        """``head_dtype``: the segmentation head's dtype (``FusionStudent.head_to``; see ``resolve_head_dtype``)."""
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.half = bool(half) and cuda
        self.dtype = torch.float16 if self.half else torch.float32
        self.cuda_graphs = bool(cuda_graphs) and cuda and not compile
        self.chroma = reads_chroma(model)
        model = prepare_module(model).to(self.device, memory_format=torch.channels_last)
        self.head_dtype = head_dtype if hasattr(model, "head_to") else torch.float32
        if self.head_dtype != torch.float32:
            model.head_to(self.head_dtype)
        self.net = _WithLabels(model.half() if self.half else model).eval()
        if compile:
            mode = "reduce-overhead" if cuda and cuda_graphs else None
            self.net = torch.compile(self.net, dynamic=False, mode=mode, options=None if mode else {"freezing": True})
        self._buffers: dict[tuple[int, int], dict] = {}

    def _buffers_for(self, h: int, w: int) -> dict:
        """Host and device buffers for one input size (and its CUDA graph), made on first use."""
        key = (h, w)
        if key not in self._buffers:
            buf = {"host_in": torch.empty((2, 1, 1, h, w), pin_memory=True)}
            buf["dev_in"] = torch.empty((2, 1, 1, h, w), device=self.device, dtype=self.dtype)
            chroma = ()
            if self.chroma:  # neutral until a pair brings its chroma
                buf["host_chroma"] = torch.full((1, h, w, 2), 128, dtype=torch.uint8, pin_memory=True)
                chroma = (buf["host_chroma"].to(self.device),)
                buf["dev_chroma"] = chroma[0]
            buf["host_fused"] = torch.empty((h, w), pin_memory=True)
            buf["host_labels"] = torch.empty((h, w), dtype=torch.uint8, pin_memory=True)
            if self.cuda_graphs:
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(3):  # warm up kernels and allocator outside the capture
                        self.net(buf["dev_in"][0], buf["dev_in"][1], *chroma)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    buf["dev_out"] = self.net(buf["dev_in"][0], buf["dev_in"][1], *chroma)
                buf["graph"] = graph
            self._buffers[key] = buf
        return self._buffers[key]

    @torch.inference_mode()
    def __call__(self, ir01: np.ndarray, vis_y: np.ndarray,
                 chroma: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        ir01 = np.ascontiguousarray(ir01, dtype=np.float32)
        vis_y = np.ascontiguousarray(vis_y, dtype=np.float32)
        chroma = chroma if self.chroma else None
        if self.device.type == "cpu":  # zero-copy views of the numpy inputs
            extra = () if chroma is None else (torch.from_numpy(np.asarray(chroma, np.uint8))[None],)  # a view
            outs = self.net(torch.from_numpy(ir01)[None, None], torch.from_numpy(vis_y)[None, None], *extra)
            return outs[0][0, 0].numpy(), outs[1][0].numpy() if len(outs) > 1 else None
        return self._run_cuda(ir01, vis_y, chroma)

    def _run_cuda(self, ir01: np.ndarray, vis_y: np.ndarray,
                  chroma: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        buf = self._buffers_for(*ir01.shape)
        host_in = buf["host_in"].numpy()
        host_in[0, 0, 0] = ir01
        host_in[1, 0, 0] = vis_y
        buf["dev_in"].copy_(buf["host_in"], non_blocking=True)
        if self.chroma:
            buf["host_chroma"].numpy()[0] = 128 if chroma is None else chroma
            buf["dev_chroma"].copy_(buf["host_chroma"], non_blocking=True)
        extra = (buf["dev_chroma"],) if self.chroma else ()
        if "graph" in buf:
            buf["graph"].replay()
            outs = buf["dev_out"]
        else:
            outs = self.net(buf["dev_in"][0], buf["dev_in"][1], *extra)
        buf["host_fused"].copy_(outs[0][0, 0], non_blocking=True)
        if len(outs) > 1:
            buf["host_labels"].copy_(outs[1][0], non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        fused = buf["host_fused"].numpy().copy()
        return fused, buf["host_labels"].numpy().copy() if len(outs) > 1 else None


def export_onnx(model: nn.Module, path: str | Path | io.BytesIO, height: int = 480, width: int = 640,
                dynamic: bool = False, opset: int = 17) -> None:
    """Export ``model`` (BatchNorm folded) to ONNX: inputs ``ir``, ``vis_y`` (1 x 1 x H x W float32) and, for
    networks that read it, ``chroma`` (1 x H x W x 2 uint8), outputs ``fused`` (1 x 1 x H x W float32) and, for
    networks with a segmentation head, ``labels`` (1 x H x W uint8).

    ``dynamic`` leaves height and width free; such a graph is exact for sizes that are multiples of 4 (the
    student's low-pass pooling becomes a fixed 4 x 4 average pool), which the ONNX backends check at run time.
    """
    if height < 16 or width < 16:
        raise ValueError(f"export size must be at least 16x16, not {width}x{height}")
    if dynamic and (height % 4 or width % 4):
        raise ValueError(f"a dynamic export needs a size that is a multiple of 4, not {width}x{height}")
    names = [*INPUT_NAMES, *[CHROMA_INPUT][:reads_chroma(model)]]
    model = _WithLabels(prepare_module(copy.deepcopy(model)).cpu().float()).eval()
    example = tuple(torch.rand(1, 1, height, width) for _ in INPUT_NAMES)
    example += tuple(torch.randint(0, 256, (1, height, width, 2), dtype=torch.uint8) for _ in names[2:])
    with torch.no_grad():
        outputs = ["fused", "labels"][:len(model(*example))]
    axes = {name: {2: "height", 3: "width"} for name in (*INPUT_NAMES, "fused")} if dynamic else None
    if dynamic and len(names) > 2:
        axes[CHROMA_INPUT] = {1: "height", 2: "width"}
    if dynamic and "labels" in outputs:
        axes["labels"] = {1: "height", 2: "width"}
    _register_pooling_symbolic(opset)
    with warnings.catch_warnings():  # the tracer's notes on Python-side shape arithmetic, and that this exporter
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # is the TorchScript one: the torch.export one
        warnings.simplefilter("ignore", DeprecationWarning)  # needs onnxscript and cannot pool a dynamic size
        torch.onnx.export(model, example, path, input_names=names, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)


def _register_pooling_symbolic(opset: int) -> None:
    """Export the student's low-pass pooling (``adaptive_avg_pool2d`` to the coefficient grid, ceil(size / 4), see
    ``model.grid_average``; its traced output size is not a constant) as an exact AveragePool when the windows are
    even, or as MatMuls with constant pooling matrices when they are not."""
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    def adaptive_avg_pool2d(g, x, output_size):
        h, w = symbolic_helper._get_tensor_sizes(x)[-2:]
        if h is None or w is None or (h % POOL_FACTOR == 0 and w % POOL_FACTOR == 0):
            return g.op("AveragePool", x, kernel_shape_i=[POOL_FACTOR] * 2, strides_i=[POOL_FACTOR] * 2)
        rows = _pooling_matrix(h, -(-h // POOL_FACTOR)).T.contiguous()  # h x out_h
        cols = _pooling_matrix(w, -(-w // POOL_FACTOR)).T.contiguous()  # w x out_w
        pooled_w = g.op("MatMul", x, g.op("Constant", value_t=cols))  # N x C x h x out_w
        pooled_t = g.op("MatMul", g.op("Transpose", pooled_w, perm_i=[0, 1, 3, 2]), g.op("Constant", value_t=rows))
        return g.op("Transpose", pooled_t, perm_i=[0, 1, 3, 2])

    register_custom_op_symbolic("aten::adaptive_avg_pool2d", adaptive_avg_pool2d, opset)


def _pooling_matrix(size: int, out: int) -> torch.Tensor:
    """out x size matrix of adaptive average pooling along one axis (PyTorch's window rule)."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class OnnxRuntimeBackend:
    """Runs an ONNX graph with ONNX Runtime: a given file, or the model exported in memory once per input size."""

    def __init__(self, model: nn.Module | None = None, onnx_path: str | Path | None = None,
                 device: torch.device = torch.device("cpu"), tensorrt: bool = False, half: bool = False,
                 engine_cache: str | Path = DEFAULT_ENGINE_CACHE):
        import onnxruntime as ort

        if model is None and onnx_path is None:
            raise ValueError("the ONNX backend needs a model or an ONNX file")
        self.ort = ort
        self.device = torch.device(device)
        self.name = "tensorrt" if tensorrt else "onnxruntime"
        self.half = bool(half) and tensorrt
        self.engine_cache = Path(engine_cache)
        self.model = model
        self.onnx_path = None if onnx_path is None else Path(onnx_path)
        wanted = "TensorrtExecutionProvider" if tensorrt else (
            "CUDAExecutionProvider" if self.device.type == "cuda" else "CPUExecutionProvider")
        if wanted not in ort.get_available_providers():
            raise ValueError(f"backend '{self.name}' needs ONNX Runtime's {wanted}, which this install lacks "
                             f"(available: {', '.join(ort.get_available_providers())})")
        self.provider = wanted
        self._sessions: dict[tuple[int, int] | None, tuple[object, bool]] = {}  # size -> (session, reads chroma)
        self._file_size = None  # (h, w) of a fixed-size ONNX file
        if self.onnx_path is not None:
            if not self.onnx_path.is_file():
                raise ValueError(f"{self.onnx_path}: no such ONNX file")
            import onnx

            try:
                dims = onnx.load(str(self.onnx_path)).graph.input[0].type.tensor_type.shape.dim[-2:]
            except Exception as exc:  # noqa: BLE001 - protobuf decode errors have no common public base
                raise ValueError(f"{self.onnx_path}: not a readable ONNX file ({type(exc).__name__})") from None
            if all(d.HasField("dim_value") for d in dims):
                self._file_size = tuple(d.dim_value for d in dims)

    def _options(self):
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        # Idle pool threads sleep instead of spinning: spinning starves torch, OpenCV and other nodes on the CPU.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def _providers(self, size: tuple[int, int] | None) -> list:
        if self.provider == "TensorrtExecutionProvider":
            options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(self._engine_dir(size)),
                       "trt_fp16_enable": self.half, "device_id": self.device.index or 0}
            return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]
        if self.provider == "CUDAExecutionProvider":
            return [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _engine_dir(self, size: tuple[int, int] | None) -> Path:
        """Engine cache directory for this GPU, TensorRT version and input size (``dynamic`` for such files)."""
        try:
            import tensorrt

            trt_version = tensorrt.__version__
        except ImportError:
            trt_version = "unknown"
        gpu = torch.cuda.get_device_name(self.device) if torch.cuda.is_available() else "nogpu"
        size = size or self._file_size
        shape = f"{size[1]}x{size[0]}" if size else "dynamic"
        key = "_".join("".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in part)
                       for part in (gpu, f"trt{trt_version}", shape, "fp16" if self.half else "fp32"))
        path = self.engine_cache / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _session(self, size: tuple[int, int] | None):
        if size not in self._sessions:
            if size is None:
                source = str(self.onnx_path)
            else:
                data = io.BytesIO()
                export_onnx(self.model, data, size[0], size[1])
                source = data.getvalue()
            session = self.ort.InferenceSession(source, self._options(), providers=self._providers(size))
            self._sessions[size] = session, any(i.name == CHROMA_INPUT for i in session.get_inputs())
        return self._sessions[size]

    def _session_for(self, h: int, w: int):
        if self.onnx_path is None:
            return self._session((h, w))
        if self._file_size is None and (h % 4 or w % 4):
            raise ValueError(f"{self.onnx_path}: a dynamic ONNX graph is exact only for sizes that are multiples "
                             f"of 4, not {w}x{h} (export this size with 'ivf export --size {w}x{h}')")
        if self._file_size is not None and self._file_size != (h, w):
            fh, fw = self._file_size
            raise ValueError(f"{self.onnx_path}: exported for {fw}x{fh} inputs, got {w}x{h}")
        return self._session(None)

    def __call__(self, ir01: np.ndarray, vis_y: np.ndarray,
                 chroma: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        ir01 = np.ascontiguousarray(ir01, dtype=np.float32)
        vis_y = np.ascontiguousarray(vis_y, dtype=np.float32)
        session, reads = self._session_for(*ir01.shape)
        feed = {INPUT_NAMES[0]: ir01[None, None], INPUT_NAMES[1]: vis_y[None, None]}
        if reads:  # neutral for gray cameras
            feed[CHROMA_INPUT] = (np.full((1, *ir01.shape, 2), 128, np.uint8) if chroma is None
                                  else np.ascontiguousarray(chroma, np.uint8)[None])
        outputs = session.run(None, feed)
        return outputs[0][0, 0], outputs[1][0] if len(outputs) > 1 else None


def make_backend(name: str, model: nn.Module | None, device: str | torch.device = "cpu", half: bool = False,
                 onnx_path: str | Path | None = None, cuda_graphs: bool = False,
                 engine_cache: str | Path = DEFAULT_ENGINE_CACHE, head_precision: str = "auto"):
    """The backend called ``name`` (one of ``BACKENDS``) for ``model`` on ``device``.

    ``onnx_path`` (ONNX backends only) runs that exported file instead of exporting ``model`` per input size;
    ``engine_cache`` is where the TensorRT backend keeps its engines; ``head_precision``: auto, float32 or
    bfloat16 (``resolve_head_dtype``).
    """
    device = torch.device(device)
    head_dtype = resolve_head_dtype(head_precision, device, name)
    if name in ("torch", "compile"):
        if model is None:
            raise ValueError(f"backend '{name}' needs a model")
        return TorchBackend(model, device, half=half, compile=name == "compile", cuda_graphs=cuda_graphs,
                            head_dtype=head_dtype)
    if name in ONNX_BACKENDS:
        if name == "tensorrt" and device.type != "cuda":
            raise ValueError("backend 'tensorrt' needs a CUDA device")
        return OnnxRuntimeBackend(model, onnx_path, device, tensorrt=name == "tensorrt", half=half,
                                  engine_cache=engine_cache)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not '{name}'")
