"""``ivf export --format onnx``: the graph matches torch within 1e-3 relative on a real checkpoint file."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ivf_ros import cli
from ivf_ros.backends import make_backend
from ivf_ros.checkpoint import load_checkpoint, save_checkpoint
from ivf_ros.model import FusionStudent
from ivf_ros.tools.export import check_against_torch, label_errors, relative_error

from test_backends import METADATA, pair, random_student, reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.safetensors", random_student(3), METADATA)


def export(checkpoint, tmp_path, *args):
    out = tmp_path / "net.onnx"
    code = cli.main(["export", "--checkpoint", str(checkpoint), "-o", str(out), *args])
    return code, out


@pytest.mark.parametrize("size", ["96x64", "131x93"])  # even and uneven low-pass pooling windows
def test_fixed_size_export_matches_torch(checkpoint, tmp_path, size):
    code, path = export(checkpoint, tmp_path, "--size", size)
    assert code == 0
    w, h = (int(v) for v in size.split("x"))
    model, _ = load_checkpoint(checkpoint)
    errors = check_against_torch(model, path, w, h)
    assert errors["fused"] < 1e-3 and errors["labels"] == 0.0
    graph = onnx.load(str(path))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["ivf_ros"])["classes"] == METADATA["classes"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["ir", "vis_y"]
    assert [o.name for o in session.get_outputs()] == ["fused", "labels"]


def test_dynamic_export_runs_other_sizes_in_the_backend(checkpoint, tmp_path):
    code, path = export(checkpoint, tmp_path, "--dynamic", "--size", "128x96")
    assert code == 0
    model, _ = load_checkpoint(checkpoint)
    backend = make_backend("onnxruntime", model, onnx_path=path)
    for h, w in [(96, 128), (60, 84)]:
        ir01, vis_y = pair(h, w)
        fused_ref, logits_ref = reference(checkpoint, ir01, vis_y)
        fused, labels = backend(ir01, vis_y)
        assert relative_error(fused, fused_ref) < 1e-3
        assert label_errors(labels, logits_ref) == 0.0
    with pytest.raises(ValueError, match="multiples of 4"):
        backend(*pair(61, 84))


def test_fixed_export_rejects_other_sizes(checkpoint, tmp_path):
    _, path = export(checkpoint, tmp_path, "--size", "64x48")
    backend = make_backend("onnxruntime", None, onnx_path=path)
    with pytest.raises(ValueError, match="exported for 64x48"):
        backend(*pair(50, 64))


def test_export_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert export(checkpoint, tmp_path, "--dynamic", "--size", "130x93")[0] == 2
    assert "multiple of 4" in capsys.readouterr().err
    assert cli.main(["export", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf \xff\xff")
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        make_backend("onnxruntime", None, onnx_path=garbage)


def test_mismatch_is_reported(checkpoint, tmp_path):
    """The check compares against the checkpoint, so a graph of other weights fails it."""
    _, path = export(checkpoint, tmp_path, "--size", "64x48")
    other = random_student(seed=7)
    errors = check_against_torch(other, path, 64, 48)
    assert errors["fused"] > 1e-3 or errors["labels"] > 0.0


@pytest.mark.skipif(not torch.cuda.is_available() or "TensorrtExecutionProvider" not in ort.get_available_providers(),
                    reason="needs a CUDA device and ONNX Runtime's TensorRT execution provider")
def test_tensorrt_engine_is_built_and_cached(checkpoint, tmp_path):
    _, path = export(checkpoint, tmp_path, "--size", "128x96")
    backend = make_backend("tensorrt", None, "cuda", onnx_path=path, engine_cache=tmp_path / "engines")
    ir01, vis_y = pair(96, 128)
    fused_ref, _ = reference(checkpoint, ir01, vis_y)
    fused, _ = backend(ir01, vis_y)
    assert relative_error(fused, fused_ref) < 2e-3
    assert any(backend.engine_cache.rglob("*")), "no engine was cached"


def test_dynamic_export_of_a_head_that_reads_the_chroma(tmp_path):
    torch.manual_seed(0)
    model = FusionStudent(width=8, seg_width=8, seg_context=8, seg_chroma=1).eval()
    torch.nn.init.normal_(model.seg_chroma_conv.weight, std=1.0)
    checkpoint = save_checkpoint(tmp_path / "colour.safetensors", model, METADATA)
    code, path = export(checkpoint, tmp_path, "--dynamic", "--size", "96x64")  # checked against torch, with chroma
    assert code == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["ir", "vis_y", "chroma"]
    backend = make_backend("onnxruntime", None, onnx_path=path)
    ir01, vis_y = pair(60, 84)
    chroma = np.random.default_rng(0).integers(96, 160, (60, 84, 2), dtype=np.uint8)
    with torch.inference_mode():
        colour = torch.from_numpy(chroma).permute(2, 0, 1)[None].float() / 255
        logits = model(torch.from_numpy(ir01)[None, None], torch.from_numpy(vis_y)[None, None], colour)[1]
    assert label_errors(backend(ir01, vis_y, chroma)[1], logits[0].numpy()) == 0.0
