"""Student network and pipeline: sizes, gray/colour inputs, IR encodings, colour restoration."""
import numpy as np
import pytest
import torch

from ivf_ros.imageops import IRNormalizer, merge_luminance, split_luminance
from ivf_ros.model import FusionStudent
from ivf_ros.pipeline import FusionPipeline, resolve_device


@pytest.fixture(scope="module")
def pipe():
    return FusionPipeline(device="cpu")  # the shipped checkpoint


@pytest.mark.parametrize("h,w", [(37, 53), (120, 161), (481, 641), (8, 8)])
def test_network_output_has_exactly_the_input_size(h, w):
    model = FusionStudent(num_classes=4, width=8).eval()
    with torch.no_grad():
        fused, logits = model(torch.rand(2, 1, h, w), torch.rand(2, 1, h, w))
    assert fused.shape == (2, 1, h, w)
    assert logits.shape == (2, 4, h, w)
    assert float(fused.min()) >= 0.0 and float(fused.max()) <= 1.0


def test_fresh_network_is_max_fusion():
    """The coefficient head starts at zero, so training starts from the pixel-wise maximum of the sources."""
    model = FusionStudent(width=8).eval()
    ir, vis = torch.rand(1, 1, 64, 48), torch.rand(1, 1, 64, 48)
    with torch.no_grad():
        fused, _ = model(ir, vis)
    assert torch.allclose(fused, torch.maximum(ir, vis), atol=1e-5)


def test_folded_batchnorm_gives_the_same_output():
    model = FusionStudent(width=8)
    model.train()
    with torch.no_grad():  # populate running statistics
        model(torch.rand(4, 1, 64, 64), torch.rand(4, 1, 64, 64))
    model.eval()
    ir, vis = torch.rand(1, 1, 50, 70), torch.rand(1, 1, 50, 70)
    with torch.no_grad():
        ref = model(ir, vis)
        folded = model.fold_batchnorm()(ir, vis)
    for a, b in zip(ref, folded):
        assert torch.allclose(a, b, atol=1e-4)


def test_colour_visible_gives_colour_output_with_visible_chroma(pipe):
    rng = np.random.default_rng(0)  # moderate colours, so no channel clips when the luminance changes
    vis = (np.array([90, 120, 150]) + rng.integers(-10, 11, (93, 131, 3))).astype(np.uint8)
    ir = rng.integers(60, 200, (93, 131), dtype=np.uint8)
    result = pipe(ir, vis)
    assert result.fused.shape == (93, 131, 3) and result.fused.dtype == np.uint8
    assert result.labels.shape == (93, 131) and result.labels.dtype == np.uint8
    assert int(result.labels.max()) < len(pipe.classes)
    _, chroma_in = split_luminance(vis)
    _, chroma_out = split_luminance(result.fused)
    assert np.abs(chroma_in.astype(int) - chroma_out.astype(int)).max() <= 2


def test_gray_visible_gives_gray_output(pipe):
    vis = np.random.default_rng(1).integers(0, 256, (64, 80), dtype=np.uint8)
    ir = np.random.default_rng(2).integers(0, 65535, (64, 80), dtype=np.uint16)
    result = pipe(ir, vis)
    assert result.fused.shape == (64, 80) and result.fused.dtype == np.uint8


def test_ir_of_another_resolution_is_registered_to_the_visible_frame(pipe):
    vis = np.zeros((96, 128, 3), np.uint8)
    ir = np.zeros((48, 64), np.uint8)
    ir[20:28, 30:34] = 255  # a hot object, twice as large in the visible frame
    result = pipe(ir, vis)
    assert result.fused.shape[:2] == (96, 128)
    hot = np.argwhere(result.ir_registered > 0.5)
    assert hot[:, 0].min() >= 38 and hot[:, 0].max() <= 57 and hot[:, 1].min() >= 58 and hot[:, 1].max() <= 69


def test_luminance_split_round_trip():
    vis = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    y, chroma = split_luminance(vis)
    assert np.abs(merge_luminance(y, chroma).astype(int) - vis).max() <= 2


def test_ir_normalizer_modes():
    raw = np.linspace(1000, 9000, 100 * 100).reshape(100, 100).astype(np.uint16)
    fixed = IRNormalizer("fixed", fixed_range=(1000, 9000))(raw)
    assert fixed.min() == pytest.approx(0.0) and fixed.max() == pytest.approx(1.0)
    perc = IRNormalizer("percentile", percentiles=(1, 99), smoothing=0.0)(raw)
    assert perc.dtype == np.float32 and 0.0 <= perc.min() and perc.max() <= 1.0
    norm = IRNormalizer("percentile", smoothing=0.9)
    norm(raw)
    hot = norm(raw + 4000)  # a sudden global shift only slowly moves the range: no flicker
    assert hot.mean() > 0.8
    with pytest.raises(ValueError):
        IRNormalizer("fixed", fixed_range=(5, 5))
    nan = np.full((4, 4), np.nan, np.float32)
    nan[0, 0] = 1.0
    assert np.isfinite(IRNormalizer("percentile")(nan)).all()


def test_device_names_are_validated():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
