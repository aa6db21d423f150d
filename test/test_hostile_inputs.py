"""Hostile and odd inputs to the offline tools: each gets a clear one-line error or the right result, never a
traceback or a silent wrong output (issue 12). Files are real files on disk; no mocks."""
import hashlib
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from helpers import META, MSRS, copy_msrs, needs_msrs, write_checkpoint
from ivf_ros.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ivf_ros.cli import main
from ivf_ros.data import PairingError, find_pairs, read_vis
from ivf_ros.imageops import IRNormalizer, write_image
from ivf_ros.model import FusionStudent
from ivf_ros.pipeline import FusionPipeline
from ivf_ros.registration import Registration, RegistrationError


@pytest.fixture
def pair_dirs(tmp_path):
    """Two small IR/visible pairs as PNG files (an IR gradient with a hot square, a textured colour image)."""
    rng = np.random.default_rng(0)
    for sub in ("ir", "vi"):
        (tmp_path / sub).mkdir()
    for stem in ("a", "b"):
        ir = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
        ir[10:20, 10:20] = 250
        cv2.imwrite(str(tmp_path / "ir" / f"{stem}.png"), ir)
        cv2.imwrite(str(tmp_path / "vi" / f"{stem}.png"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return tmp_path


def _fuse(pair_dirs, out, *extra):
    return main(["fuse", "--ir", str(pair_dirs / "ir"), "--vis", str(pair_dirs / "vi"), "--out", str(out),
                 "--device", "cpu", *extra])


def _one_error_line(capsys) -> str:
    """The command's error line (the last line of stderr, after any progress bar); there is no traceback."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err and err.count("error:") == 1 and "fused" not in captured.out
    return err.splitlines()[-1]


# ------------------------------------------------------------------------------------------ homography files

H = "homography: [[1, 0, 0], [0, 1, 0], [0, 0, 1]]\n"


@pytest.mark.parametrize("text, reason", [
    (H + "ir_size: 640\n", "'ir_size' must be [width, height]"),
    (H + "vis_size: [a, b]\n", "'vis_size' must be [width, height]"),
    (H + "ir_size: [640.5, 512]\n", "'ir_size' must be [width, height]"),
    (H + "ir_size: [.inf, 512]\n", "'ir_size' must be [width, height]"),
    (H + "vis_size: [0, 512]\n", "'vis_size' must be [width, height]"),
    (H + "confidence: .nan\n", "'confidence' must be a number in [0.0, 1.0]"),
    (H + "confidence: true\n", "'confidence' must be a number"),
    ("homography: [[1, 0, .inf], [0, 1, 0], [0, 0, 1]]\n", "NaN or infinite"),
    ("homography: [[1, 0, 0], [0, 1, 0], [zero, 0, 1]]\n", "not a 3x3 list of numbers"),
    ("homography: [[1, 0, 0], [0, 1, 0], [false, 0, 1]]\n", "not a 3x3 list of numbers"),
    ("homography: [[1, 0, 0, 0], [0, 1, 0], [0, 1]]\n", "not a 3x3 list of numbers"),
    ("homography: [[1, 2, 3], [2, 4, 6], [0, 0, 1]]\n", "singular"),
    ("homography: [[1.0, 0, 0], [0, 1.0e-14, 0], [0, 0, 1]]\n", "singular"),
    ("- 1\n- 2\n", "not a YAML mapping"),
])
def test_bad_homography_files_name_the_file_and_the_problem(tmp_path, text, reason):
    path = tmp_path / "h.yaml"
    path.write_text(text)
    with pytest.raises(RegistrationError) as err:
        Registration.load(path)
    assert str(err.value).startswith(f"{path}: ") and reason in str(err.value) and "\n" not in str(err.value)


def test_directory_device_huge_and_binary_homography_files(tmp_path):
    with pytest.raises(RegistrationError, match="is a directory"):
        Registration.load(tmp_path)
    with pytest.raises(RegistrationError, match="not a regular file"):
        Registration.load("/dev/zero")
    huge = tmp_path / "huge.yaml"
    huge.write_text(H + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(RegistrationError, match="too large"):
        Registration.load(huge)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00homography")
    with pytest.raises(RegistrationError, match="not a text file"):
        Registration.load(binary)
    big_scale = tmp_path / "scaled.yaml"  # a well-conditioned matrix at a small scale is not singular;
    big_scale.write_text("homography: [[1e-6, 0, 3e-5], [0, 1e-6, 0], [0, 0, 1e-6]]\n")  # YAML: 1e-6 is a string
    assert Registration.load(big_scale).matrix[0, 2] == pytest.approx(30.0)


def test_fuse_with_a_bad_homography_prints_one_line(pair_dirs, tmp_path, capsys):
    bad = tmp_path / "h.yaml"
    bad.write_text(H + "ir_size: 640\n")
    assert _fuse(pair_dirs, tmp_path / "o", "--homography", str(bad)) == 2
    assert "h.yaml" in _one_error_line(capsys)
    assert _fuse(pair_dirs, tmp_path / "o", "--homography", str(tmp_path)) == 2
    assert "is a directory" in _one_error_line(capsys)


# -------------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("meta_changes, weight, reason", [
    (None, lambda t: torch.full_like(t, float("nan")), "NaN or infinite"),
    (None, lambda t: t.to(torch.int32), "stored as I32"),
    ({"hyper_parameters": {"num_classes": 2, "width": 100000}}, None, "width = 100000"),
    ({"hyper_parameters": {"num_classes": 100000000, "width": 8}}, None, "num_classes = 100000000"),
    ({"architecture": ["ivf_coeffnet"]}, None, "architecture must be a string"),
    ({"classes": 2}, None, "classes must be a non-empty list"),
])
def test_fuse_with_a_bad_checkpoint_prints_one_line(pair_dirs, tmp_path, capsys, meta_changes, weight, reason):
    path = write_checkpoint(tmp_path / "bad.safetensors", meta_changes, weight)
    assert _fuse(pair_dirs, tmp_path / "o", "--checkpoint", str(path)) == 2
    err = _one_error_line(capsys)
    assert "bad.safetensors" in err and reason in err
    assert not (tmp_path / "o").exists()  # refused before anything was fused or written


def test_info_on_bad_metadata_is_one_line(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "bad.safetensors", {"palette": [[0, 0, 0], "red"]})
    assert main(["info", str(path)]) == 2
    assert "palette colour 1" in _one_error_line(capsys)


# ----------------------------------------------------------------------------------------------- image writing

def test_fuse_into_an_unwritable_folder_fails(pair_dirs, capsys):
    assert _fuse(pair_dirs, "/proc") == 2
    err = _one_error_line(capsys)
    assert "/proc/a.png" in err and "cannot write image" in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to stand for a full disk")
def test_fuse_onto_a_full_disk_fails(pair_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").symlink_to("/dev/full")  # every write to it fails with ENOSPC, as on a full disk
    assert _fuse(pair_dirs, out) == 2
    assert "No space left on device" in _one_error_line(capsys)


def test_write_image_refuses_what_it_cannot_encode(tmp_path):
    img = np.zeros((4, 4), np.uint8)
    assert cv2.imread(str(write_image(tmp_path / "x.png", img)), cv2.IMREAD_UNCHANGED).shape == (4, 4)
    with pytest.raises(OSError, match="x.nope"):
        write_image(tmp_path / "x.nope", img)
    with pytest.raises(OSError, match="no_folder"):
        write_image(tmp_path / "no_folder" / "x.png", img)


# ---------------------------------------------------------------------------------------------- image folders

def test_float_visible_images_are_taken_as_unit_range_or_refused(tmp_path):
    vis = np.linspace(0.0, 1.0, 48 * 64 * 3, dtype=np.float32).reshape(48, 64, 3)
    assert cv2.imwrite(str(tmp_path / "unit.tiff"), vis)
    assert np.array_equal(read_vis(tmp_path / "unit.tiff"), np.round(vis * 255.0).astype(np.uint8))
    assert cv2.imwrite(str(tmp_path / "raw.tiff"), vis * 255.0)
    with pytest.raises(ValueError, match=r"raw.tiff: float32 visible image has values in \[0, 255\]"):
        read_vis(tmp_path / "raw.tiff")
    vis[0, 0, 0] = np.nan
    assert cv2.imwrite(str(tmp_path / "nan.tiff"), vis)
    with pytest.raises(ValueError, match="nan.tiff.*NaN"):
        read_vis(tmp_path / "nan.tiff")


def test_two_images_with_one_stem_are_an_error(pair_dirs, tmp_path, capsys):
    shutil.copy(pair_dirs / "vi" / "a.png", pair_dirs / "vi" / "a.jpg")
    with pytest.raises(PairingError) as err:
        find_pairs(pair_dirs / "ir", pair_dirs / "vi")
    assert "a.jpg" in str(err.value) and "a.png" in str(err.value)
    assert _fuse(pair_dirs, tmp_path / "o") == 2
    assert "share the stem 'a'" in _one_error_line(capsys)


# ------------------------------------------------------------------------------------------ IR normalisation

def test_fixed_ir_normalisation_uses_the_full_scale_or_the_given_raw_range():
    ir8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert IRNormalizer("fixed")(ir8) == pytest.approx(ir8 / 255.0, abs=1e-7)
    ir16 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    assert IRNormalizer("fixed")(ir16) == pytest.approx(ir8 / 255.0, abs=1e-6)
    ranged = IRNormalizer("fixed", fixed_range=(7000, 9000))(np.array([[6000, 7000, 8000, 9000, 9500]], np.uint16))
    assert ranged.tolist() == [[0.0, 0.0, 0.5, 1.0, 1.0]]
    assert IRNormalizer("percentile", percentiles=(0, 100), smoothing=0.0)(ir16).max() == 1.0


@pytest.mark.parametrize("kwargs, reason", [
    ({"fixed_range": (0.0, float("inf"))}, "finite"),
    ({"fixed_range": (float("nan"), 1.0)}, "finite"),
    ({"fixed_range": (9000.0, 7000.0)}, "low < high"),
    ({"fixed_range": (1.0,)}, "must be [low, high]"),
    ({"percentiles": (99.0, 1.0)}, "low < high"),
    ({"percentiles": (1.0, 120.0)}, "[0, 100]"),
])
def test_ir_normaliser_refuses_bad_ranges(kwargs, reason):
    with pytest.raises(ValueError) as err:
        IRNormalizer("fixed", **kwargs)
    assert reason in str(err.value)


def test_fuse_fixed_ir_norm_on_8_bit_ir_is_full_scale(pair_dirs, tmp_path, capsys):
    assert _fuse(pair_dirs, tmp_path / "auto") == 0
    assert _fuse(pair_dirs, tmp_path / "fixed", "--ir-norm", "fixed") == 0
    assert _fuse(pair_dirs, tmp_path / "ranged", "--ir-norm", "fixed", "--ir-range", "0", "100") == 0
    for stem in ("a", "b"):
        auto, fixed, ranged = (cv2.imread(str(tmp_path / d / f"{stem}.png")) for d in ("auto", "fixed", "ranged"))
        assert np.array_equal(auto, fixed) and not np.array_equal(fixed, ranged)
    capsys.readouterr()
    assert _fuse(pair_dirs, tmp_path / "bad", "--ir-norm", "fixed", "--ir-range", "0", "inf") == 2
    assert "finite" in _one_error_line(capsys)


# ------------------------------------------------------------- one image preparation for training and serving

@needs_msrs
@pytest.mark.parametrize("bits", [8, 16])
def test_training_prepares_images_as_the_served_pipeline_does(tmp_path, bits):
    from training.datasets import load_pairs, to_tensors

    stem = "00055D"
    ir8 = cv2.imread(str(MSRS / "ir" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
    raw = ir8 if bits == 8 else (ir8.astype(np.uint16) * 40 + 7000)  # a 14-bit-core-like range
    for sub in ("ir", "vi"):
        (tmp_path / sub).mkdir()
    cv2.imwrite(str(tmp_path / "ir" / f"{stem}.png"), raw)
    shutil.copy(MSRS / "vi" / f"{stem}.png", tmp_path / "vi" / f"{stem}.png")
    pipe = FusionPipeline(device="cpu")
    ir_read = cv2.imread(str(tmp_path / "ir" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
    assert ir_read.dtype == (np.uint8 if bits == 8 else np.uint16)
    vis = read_vis(tmp_path / "vi" / f"{stem}.png")
    served_ir, served_y, _ = pipe.prepare(ir_read, vis)
    ir_t, vis_y, _ = to_tensors(ir_read, vis)  # the raw frame: exactly the served preparation
    assert np.array_equal(ir_t[0].numpy(), served_ir) and np.array_equal(vis_y[0].numpy(), served_y)
    (sample,) = load_pairs(tmp_path)  # training samples keep IR at 8 bits: within half a grey level
    ir_t, vis_y, _ = to_tensors(sample.ir, sample.vis)
    assert np.abs(ir_t[0].numpy() - served_ir).max() <= (0.0 if bits == 8 else 0.5 / 255 + 1e-6)
    assert np.array_equal(vis_y[0].numpy(), served_y)


@needs_msrs
def test_training_validation_scores_what_ivf_eval_scores(tmp_path):
    from training.datasets import load_pairs
    from training.validate import VALIDATION_METRICS, validate

    copy_msrs(tmp_path, ["00008N", "00055D"])
    assert main(["eval", "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"), "--device", "cpu",
                 "--json", str(tmp_path / "r.json")]) == 0
    served = json.loads((tmp_path / "r.json").read_text())["fusion"]["model"]
    model, meta = load_checkpoint()
    trained = validate(model, load_pairs(tmp_path, classes=meta["classes"]), meta["classes"], progress=False)
    for name in VALIDATION_METRICS:  # the served network folds BatchNorm: equal up to float rounding
        assert trained[name] == pytest.approx(served[name], abs=1e-4), name


# --------------------------------------------------------------------------------------------- weight averaging

def test_averaged_checkpoint_metadata_describes_the_average(tmp_path):
    from training.average import average_checkpoints

    paths = []
    for i in range(2):
        model = FusionStudent(num_classes=2, width=8)
        torch.nn.init.constant_(model.coeff_head.weight, float(i))
        meta = {**META, "training": {"steps": 100 * (i + 1), "init": f"/tmp/run{i}.safetensors", "commit": f"c{i}",
                                     "loss": {"ssim": float(i)}, "data": [{"root": "msrs"}]},
                "validation": {"score": float(i)}}
        paths.append(save_checkpoint(tmp_path / f"m{i}.safetensors", model, meta))
    model, meta = average_checkpoints(paths)
    assert float(model.coeff_head.weight.detach().mean()) == pytest.approx(0.5)
    training = meta["training"]
    assert not {"steps", "init", "loss", "weight_average"} & set(training) and "validation" not in meta
    assert "average" in training["method"]
    assert [x["checkpoint"] for x in training["inputs"]] == [str(p) for p in paths]
    assert [x["sha256"] for x in training["inputs"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert [x["steps"] for x in training["inputs"]] == [100, 200]
    assert load_checkpoint(save_checkpoint(tmp_path / "avg.safetensors", model, meta))[1]["training"] == training
    other = save_checkpoint(tmp_path / "other.safetensors", FusionStudent(num_classes=2, width=8),
                            {**META, "classes": ["background", "car"]})
    with pytest.raises(CheckpointError, match="classes differ"):
        average_checkpoints([paths[0], other])


# ---------------------------------------------------------------------------------- training logs on resumption

def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@needs_msrs
def test_resume_and_rerun_log_every_step_once(tmp_path):
    from training.train import load_config, train

    cfg = load_config("training/configs/student.yaml")
    cfg.pop("init", None)
    cfg["data"] = [{"root": "msrs", "layout": "pairs", "split": "train", "limit": 2}]
    cfg["val"] = {"root": "msrs", "layout": "pairs", "split": "val", "limit": 1}
    cfg["model"] = {"width": 8}
    cfg["train"].update(steps=4, batch=2, crop=64, val_every=2, threads=1)
    train(cfg, tmp_path, progress=False)
    assert _steps(tmp_path / "log.jsonl") == [0, 2, 4] and _steps(tmp_path / "losses.jsonl") == [1, 2, 3, 4]
    # An interruption after step 3 was logged, with the state saved at step 2: rewind the saved state to step 2.
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state["step"] = 2
    state["scheduler"].update(last_epoch=2, _step_count=3)
    torch.save(state, tmp_path / "last.pt")
    with open(tmp_path / "log.jsonl") as f:
        log = f.read().splitlines()
    (tmp_path / "log.jsonl").write_text("\n".join(log[:2]) + '\n{"step": 3, "VI')  # cut mid-line
    train(cfg, tmp_path, resume=True, progress=False)
    assert _steps(tmp_path / "log.jsonl") == [0, 2, 4] and _steps(tmp_path / "losses.jsonl") == [1, 2, 3, 4]
    train(cfg, tmp_path, progress=False)  # a fresh run into the old folder starts new logs
    assert _steps(tmp_path / "log.jsonl") == [0, 2, 4] and _steps(tmp_path / "losses.jsonl") == [1, 2, 3, 4]
