"""Network backends, the SAGE reference architecture, timing helpers and ``ivf bench``.

CUDA paths (half precision, pinned buffers, CUDA graphs, torch.compile) run only where CUDA exists.
"""
import json
import os
import platform
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from helpers import MSRS, needs_msrs
from ivf_ros import backends, cli
from ivf_ros.backends import make_backend, native_bf16, resolve_head_dtype
from ivf_ros.data import read_ir, read_vis
from ivf_ros.bench import time_interleaved
from ivf_ros.checkpoint import load_checkpoint, save_checkpoint
from ivf_ros.model import FusionStudent, count_parameters
from ivf_ros.pipeline import FusionPipeline
from ivf_ros.sage_student import SageStudent
from ivf_ros.tools.bench import parse_sizes
from ivf_ros.tools.export import label_errors, relative_error

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
METADATA = {"classes": ["background", "person", "bicycle", "car"],
            "palette": [[0, 0, 0], [220, 20, 60], [255, 200, 0], [0, 120, 255]]}


def random_student(seed: int = 0) -> FusionStudent:
    """A student with random weights, BatchNorm statistics and class biases calibrated on random scenes, so that
    fusion and labels vary over the image (a fresh one is a constant-label average fusion)."""
    torch.manual_seed(seed)
    model = FusionStudent()
    scenes = [torch.from_numpy(np.stack(pair(64, 64, seed=s))).unsqueeze(1) for s in range(4)]
    ir, vis_y = torch.cat([x[:1] for x in scenes]), torch.cat([x[1:] for x in scenes])
    with torch.no_grad():
        torch.nn.init.normal_(model.coeff_head.weight, std=0.1)  # zero at initialisation
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.momentum = None  # running statistics = plain averages over the calibration batch
        model.train()(ir, vis_y)
        _, logits = model.eval()(ir, vis_y)
        model.seg_head.bias -= logits.mean((0, 2, 3))
    return model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A real checkpoint file of the shipped architecture with random (non-trivial) weights."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.safetensors", random_student(), METADATA)


def reference(checkpoint, ir01, vis_y):
    """Float32 CPU outputs of the unmodified network: (fused H x W, logits C x H x W)."""
    model, _ = load_checkpoint(checkpoint)
    with torch.inference_mode():
        fused, logits = model(torch.from_numpy(ir01)[None, None], torch.from_numpy(vis_y)[None, None])
    return fused[0, 0].numpy(), logits[0].numpy()


def pair(h, w, seed=1):
    """Registered IR and visible luminance: blobs at several scales plus pixel noise, in [0, 1]."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(2):
        image = 0.1 * rng.random((h, w), dtype=np.float32)
        for cells in (2, 5):
            image += 0.45 * cv2.resize(rng.random((cells, cells), dtype=np.float32), (w, h))
        images.append(image)
    return images[0], images[1]


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
@pytest.mark.parametrize("h,w", [(64, 96), (37, 53)])
def test_cpu_backends_match_the_float32_network(checkpoint, name, h, w):
    ir01, vis_y = pair(h, w)
    fused_ref, logits_ref = reference(checkpoint, ir01, vis_y)
    model, _ = load_checkpoint(checkpoint)
    fused, labels = make_backend(name, model, head_precision="float32")(ir01, vis_y)
    assert fused.shape == (h, w) and fused.dtype == np.float32
    assert labels.shape == (h, w) and labels.dtype == np.uint8
    assert relative_error(fused, fused_ref) < 1e-4
    assert label_errors(labels, logits_ref) == 0.0
    assert len(np.unique(labels)) > 1  # the random network is not trivially constant


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
@pytest.mark.parametrize("h,w", [(64, 96), (37, 53)])
def test_backends_hand_the_chroma_to_a_head_that_reads_it(name, h, w):
    torch.manual_seed(0)
    model = FusionStudent(width=8, seg_width=8, seg_context=8, seg_chroma=1).eval()
    torch.nn.init.normal_(model.seg_chroma_conv.weight, std=1.0)
    ir01, vis_y = pair(h, w)
    chroma = np.random.default_rng(0).integers(96, 160, (h, w, 2), dtype=np.uint8)
    with torch.inference_mode():
        colour = torch.from_numpy(chroma).permute(2, 0, 1)[None].float() / 255
        logits = [model(torch.from_numpy(ir01)[None, None], torch.from_numpy(vis_y)[None, None], c)[1][0].numpy()
                  for c in (colour, None)]
    backend = make_backend(name, model, head_precision="float32")
    with_colour, gray = backend(ir01, vis_y, chroma)[1], backend(ir01, vis_y)[1]
    assert label_errors(with_colour, logits[0]) == 0.0 and label_errors(gray, logits[1]) == 0.0
    assert np.mean(with_colour != gray) > 0.01  # the colour does reach the labels


def test_pipeline_gives_the_visible_chroma_to_the_head(tmp_path):
    torch.manual_seed(0)
    model = FusionStudent(width=8, seg_width=8, seg_context=8, seg_chroma=1).eval()
    torch.nn.init.normal_(model.seg_chroma_conv.weight, std=1.0)
    pipe = FusionPipeline(save_checkpoint(tmp_path / "colour.safetensors", model, METADATA), "cpu")
    rng = np.random.default_rng(0)
    ir, vis = rng.integers(0, 256, (48, 64), dtype=np.uint8), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ir01, vis_y, chroma = pipe.prepare(ir, vis)
    labels = pipe(ir, vis).labels
    assert np.array_equal(labels, pipe.infer(ir01, vis_y, chroma)[1])
    assert not np.array_equal(labels, pipe.infer(ir01, vis_y)[1])


def test_label_check_catches_wrong_labels(checkpoint):
    ir01, vis_y = pair(32, 32)
    _, logits = reference(checkpoint, ir01, vis_y)
    wrong = ((logits.argmax(0) + 1) % logits.shape[0]).astype(np.uint8)
    assert label_errors(wrong, logits) > 0.5


def test_backend_serves_several_sizes_in_turn(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    backend = make_backend("onnxruntime", model)
    for h, w in [(48, 64), (40, 56), (48, 64)]:
        fused, labels = backend(*pair(h, w))
        assert fused.shape == labels.shape == (h, w)


def test_pipeline_backends_agree(checkpoint):
    rng = np.random.default_rng(0)
    ir = rng.integers(0, 65535, (60, 90), dtype=np.uint16)
    vis = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    results = [FusionPipeline(checkpoint, "cpu", backend=name, head_precision="float32")(ir, vis)
               for name in ("torch", "onnxruntime")]
    assert results[0].fused.shape == (50, 70, 3) and results[0].labels.shape == (50, 70)
    assert np.abs(results[0].fused.astype(int) - results[1].fused.astype(int)).max() <= 1
    assert np.mean(results[0].labels != results[1].labels) < 1e-3


FAULTS_PER_PAIR = """
import resource, sys
import numpy as np, torch
from ivf_ros.backends import make_backend
from ivf_ros.model import FusionStudent
if sys.argv[1] == "ivf":  # the ivf entry point, as a user runs it, before the pairs
    from ivf_ros.cli import main
    assert main(["info", sys.argv[2]]) == 0
torch.set_num_threads(1)
backend = make_backend("torch", FusionStudent(seg_width=32, seg_context=32))
inputs = np.random.default_rng(0).random((2, 480, 640), dtype=np.float32)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    backend(*inputs)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(np.median(faults[2:]))
"""


def _faults_per_pair(*args: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", FAULTS_PER_PAIR, *args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return float(run.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is glibc's")
def test_ivf_entry_point_makes_malloc_reuse_freed_memory(checkpoint):
    """With glibc's adaptive malloc thresholds a 640x480 pair of this network took a median of about 3,000 page
    faults here (fresh pages for its large temporaries); after the ``ivf`` entry point has run, malloc keeps freed
    memory, so most repeated pairs take none. A backend alone leaves the process's allocator as it is."""
    assert _faults_per_pair("plain", "-") > 1000
    assert _faults_per_pair("ivf", str(checkpoint)) < 300


def test_unknown_or_unavailable_backends_fail_clearly():
    model = FusionStudent()
    with pytest.raises(ValueError, match="backend must be one of"):
        make_backend("tflite", model)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_backend("tensorrt", model, "cpu")
    with pytest.raises(ValueError, match="needs a model"):
        make_backend("torch", None)


def test_sage_student_matches_its_published_size():
    model = SageStudent()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 15 and all(c.out_channels in (32, 1) for c in convs)
    assert 130_000 <= count_parameters(model) <= 150_000
    fused, labels = make_backend("torch", model)(*pair(40, 56))
    assert fused.shape == (40, 56) and labels is None


def test_time_interleaved_spreads_repetitions():
    calls = {"a": 0, "b": 0}

    def count(name):
        calls[name] += 1

    timings = time_interleaved({"a": (lambda: count("a"), 10), "b": (lambda: count("b"), 3)}, warmup=2)
    assert len(timings["a"].times_ms) == 10 and len(timings["b"].times_ms) == 3
    assert calls == {"a": 12, "b": 5}
    assert timings["a"].p50 <= timings["a"].p99


def test_parse_sizes():
    assert parse_sizes("640x480, 1280X1024") == [(640, 480), (1280, 1024)]
    for bad in ("640", "640x", "8x8"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_bench_command_writes_a_report(tmp_path, checkpoint, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--checkpoint", str(checkpoint), "--device", "cpu", "--sizes", "64x48,40x32",
                     "--reps", "3", "--sage-reps", "2", "--warmup", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["size"] for r in report["results"]] == ["64x48", "40x32"]
    first = report["results"][0]
    assert first["pipeline"]["reps"] == 3 and first["sage"]["reps"] == 2
    assert first["sage_over_pipeline"] > 0
    assert report["head_bf16"] == native_bf16()  # --head-precision auto
    assert "| pipeline |" in capsys.readouterr().out
    assert cli.main(["bench", "--checkpoint", str(checkpoint), "--device", "cpu", "--sizes", "40x32", "--reps", "2",
                     "--no-sage", "--head-precision", "float32", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["head_bf16"] is False


@needs_cuda
@pytest.mark.parametrize("half,cuda_graphs,tolerance", [(False, False, 2e-3), (True, False, 2e-2), (True, True, 2e-2)])
def test_cuda_backend_matches_cpu_float32(checkpoint, half, cuda_graphs, tolerance):
    ir01, vis_y = pair(120, 160)
    fused_ref, logits_ref = reference(checkpoint, ir01, vis_y)
    model, _ = load_checkpoint(checkpoint)
    backend = make_backend("torch", model, "cuda", half=half, cuda_graphs=cuda_graphs)
    for _ in range(2):  # second call reuses the per-size buffers (and replays the graph)
        fused, labels = backend(ir01, vis_y)
        assert relative_error(fused, fused_ref) < tolerance
        assert label_errors(labels, logits_ref, tolerance=10 * tolerance) < 1e-3
    other = backend(*pair(64, 80))
    assert other[0].shape == other[1].shape == (64, 80)


@needs_cuda
def test_cuda_compile_backend_matches_cpu_float32(checkpoint):
    ir01, vis_y = pair(64, 96)
    fused_ref, logits_ref = reference(checkpoint, ir01, vis_y)
    model, _ = load_checkpoint(checkpoint)
    fused, labels = make_backend("compile", model, "cuda")(ir01, vis_y)
    assert relative_error(fused, fused_ref) < 2e-3
    assert label_errors(labels, logits_ref, tolerance=2e-2) < 1e-3


@needs_cuda
def test_cuda_pipeline_runs_in_half_precision(checkpoint):
    rng = np.random.default_rng(0)
    ir = rng.integers(0, 256, (96, 128), dtype=np.uint8)
    vis = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    cpu = FusionPipeline(checkpoint, "cpu")(ir, vis)
    gpu = FusionPipeline(checkpoint, "cuda", half=True)(ir, vis)
    assert np.abs(cpu.fused.astype(int) - gpu.fused.astype(int)).max() <= 4
    assert np.mean(cpu.labels != gpu.labels) < 1e-2


needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bfloat16 (AMX, AVX512-BF16)")


@needs_bf16
@needs_msrs
def test_bfloat16_head_keeps_the_fused_image_and_nearly_every_label():
    """The shipped network on real MSRS pairs: the head in bfloat16 (the default here), the fusion path in float32."""
    pipes = {p: FusionPipeline(None, "cpu", head_precision=p) for p in ("float32", "auto")}
    assert pipes["auto"].head_bf16 and not pipes["float32"].head_bf16 and pipes["auto"].precision == "bfloat16 head"
    net = pipes["auto"].model
    assert net.seg_head.weight.dtype == torch.bfloat16 and net.coeff_head.weight.dtype == torch.float32
    assert net.stem[0].weight.dtype == torch.float32
    for stem in ("00008N", "00020N"):
        ir, vis = read_ir(MSRS / "ir" / f"{stem}.png"), read_vis(MSRS / "vi" / f"{stem}.png")
        ref, bf16 = pipes["float32"](ir, vis), pipes["auto"](ir, vis)
        assert np.array_equal(ref.fused, bf16.fused)
        assert np.mean(ref.labels != bf16.labels) < 2e-3
        assert len(np.unique(ref.labels)) > 1


def test_head_precision_is_checked_and_bfloat16_only_where_native(monkeypatch):
    model = FusionStudent(width=8, seg_width=8, seg_context=8)
    with pytest.raises(ValueError, match="head_precision must be one of"):
        make_backend("torch", model, head_precision="fp8")
    with pytest.raises(ValueError, match="needs the torch backend"):
        make_backend("onnxruntime", model, head_precision="bfloat16")
    assert resolve_head_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_head_dtype("auto", torch.device("cuda")) == torch.float32  # CUDA has half for that
    monkeypatch.setattr(backends, "native_bf16", lambda: False)  # a CPU without it: emulated bfloat16 is slower
    assert resolve_head_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="native bfloat16"):
        resolve_head_dtype("bfloat16", torch.device("cpu"))
    monkeypatch.setattr(backends, "native_bf16", lambda: True)
    assert resolve_head_dtype("auto", torch.device("cpu")) == torch.bfloat16
    backend = make_backend("torch", model, head_precision="bfloat16")
    assert backend.head_dtype == torch.bfloat16 == backend.net.net.seg_head.weight.dtype
    assert make_backend("torch", SageStudent(), head_precision="bfloat16").head_dtype == torch.float32  # no head
