"""Training data layouts, box-derived masks, losses, and a short real training run."""
import json

import cv2
import numpy as np
import pytest
import torch
import yaml

from ivf_ros.checkpoint import load_checkpoint
from ivf_ros.data import data_root
from ivf_ros.model import row_coordinates
from test_segmentation import teacher_run
from training.datasets import (IGNORE, CropDataset, Sample, TeacherCropDataset, box_mask, check_augment,
                               load_pairs, rescaled)
from ivf_ros.metrics import fusion_metrics, to_gray
from training.losses import (difference_correlation_loss, dominant_gradient_loss, fusion_loss, fusion_metrics_torch,
                             sobel, sobel_magnitude, ssim)
from training.train import crop_datasets, init_from, load_config, main as train_main, set_entry, train

CLASSES = ["background", "person", "bicycle", "car"]
DATA = data_root()
needs_data = pytest.mark.skipif(not (DATA / "msrs").is_dir(), reason=f"shared data not found at {DATA} (set IVF_DATA)")


def test_box_mask_fills_boxes_with_an_ignored_border():
    mask = box_mask((100, 100), [(0, 10, 10, 50, 90), (2, 0, 0, 100, 100)])
    assert mask[50, 30] == 1  # person inside the car box, drawn last (smaller)
    assert mask[12, 30] == IGNORE  # border band of the person box
    assert mask[85, 85] == 3 and mask[95, 95] == IGNORE and mask[0, 0] == IGNORE


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def test_pixel_label_layouts_map_onto_our_classes(tmp_path):
    rng = np.random.default_rng(0)
    ir = rng.integers(0, 256, (40, 60), dtype=np.uint8)
    vis = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = np.zeros((40, 60), np.uint8)
    label[:, :20], label[:, 20:40], label[:, 40:] = 1, 2, 3  # MSRS/MFNet ids: car, person, bike
    for stem in ("a", "b"):
        _write(tmp_path / "msrs" / "ir" / f"{stem}.png", ir)
        _write(tmp_path / "msrs" / "vi" / f"{stem}.png", vis)
        _write(tmp_path / "msrs" / "Label" / f"{stem}.png", label)
    samples = load_pairs(tmp_path / "msrs", "msrs", CLASSES)
    assert [s.stem for s in samples] == ["a", "b"]
    t = samples[0].target
    assert (t[:, :20] == 3).all() and (t[:, 20:40] == 1).all() and (t[:, 40:] == 2).all()

    fmb = np.zeros((40, 60), np.uint8)
    fmb[:, :20], fmb[:, 20:40], fmb[:, 40:] = 8, 11, 1  # FMB: person, bus (-> car), road (-> background)
    _write(tmp_path / "fmb" / "Infrared" / "x.png", ir)
    _write(tmp_path / "fmb" / "Visible" / "x.png", vis)
    _write(tmp_path / "fmb" / "Label" / "x.png", fmb)
    t = load_pairs(tmp_path / "fmb", "fmb", CLASSES)[0].target
    assert (t[:, :20] == 1).all() and (t[:, 20:40] == 3).all() and (t[:, 40:] == 0).all()

    _write(tmp_path / "mfnet" / "images" / "m.png", np.dstack([vis, ir]))  # B, G, R, thermal
    _write(tmp_path / "mfnet" / "labels" / "m.png", label)
    s = load_pairs(tmp_path / "mfnet", "mfnet", CLASSES)[0]
    assert np.array_equal(s.ir, ir) and np.array_equal(s.vis, vis) and (s.target[:, :20] == 3).all()
    with pytest.raises(ValueError, match="layout"):
        load_pairs(tmp_path / "msrs", "kitti", CLASSES)


def test_crop_dataset_shapes_and_determinism():
    rng = np.random.default_rng(1)
    samples = [Sample("s", rng.integers(0, 256, (70, 90), dtype=np.uint8),
                      rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), None)]
    ds = CropDataset(samples, crop=48, length=5, seed=3)
    ir, vis_y, ycrcb, target = ds[2]
    assert ir.shape == vis_y.shape == (1, 48, 48) and ycrcb.shape == (3, 48, 48)
    assert (target == IGNORE).all()  # unlabelled pairs train fusion only
    assert torch.equal(ds[2][0], ir)


def test_losses_are_zero_or_one_where_they_should_be():
    x = torch.rand(2, 1, 32, 32)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-4)
    assert sobel_magnitude(torch.ones(1, 1, 8, 8)).abs().max().item() == 0.0
    x = torch.rand(1, 1, 16, 16)
    assert dominant_gradient_loss(sobel(x), sobel(x), sobel(0.5 * x)).item() == 0.0  # follows the stronger edge
    assert dominant_gradient_loss(sobel(0.5 * x), sobel(x), sobel(0.5 * x)).item() > 0.0
    terms = fusion_loss(torch.maximum(x, 1 - x), x, 1 - x, {"intensity": 1.0})
    assert terms["intensity"].item() == pytest.approx(0.0)


def small_msrs_config(config: str, train_pairs: int, val_pairs: int, steps: int, batch: int) -> dict:
    """``config`` on the first MSRS training and validation pairs, with short 64-px training on one thread."""
    cfg = load_config(config)
    cfg["data"] = [{"root": "msrs", "layout": "pairs", "split": "train", "limit": train_pairs}]
    cfg["val"] = {"root": "msrs", "layout": "pairs", "split": "val", "limit": val_pairs}
    cfg["train"].update(steps=steps, batch=batch, crop=64, val_every=steps, lr=0.01, threads=1)
    return cfg


@needs_data
def test_short_real_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    cfg = small_msrs_config("training/configs/student.yaml", 6, 2, steps=30, batch=4)
    torch.manual_seed(0)
    train(cfg, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [0, 30]
    losses = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    first, last = np.mean([x["loss"] for x in losses[:5]]), np.mean([x["loss"] for x in losses[-5:]])
    assert last < first
    model, meta = load_checkpoint(tmp_path / "best.safetensors")
    assert meta["classes"] == CLASSES and meta["training"]["steps"] == 30
    assert "VIF" in meta["validation"]
    assert load_checkpoint(tmp_path / "final.safetensors")[1]["validation"]["step"] == 30
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 30
    yaml.safe_dump(meta)  # metadata stays plain data


@needs_data
def test_command_line_overrides_steps_and_output_folder(tmp_path, capsys):
    cfg = load_config("training/configs/student.yaml")
    cfg["data"] = [{"root": "msrs", "layout": "pairs", "split": "train", "limit": 2}]
    cfg["val"] = {"root": "msrs", "layout": "pairs", "split": "val", "limit": 1}
    cfg["train"].update(batch=2, crop=64, threads=1)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    args = ["--config", str(tmp_path / "tiny.yaml"), "--steps", "2", "--out", str(tmp_path / "run"),
            "--set", "seed=3", "loss.ssim=0.5"]
    assert train_main(args) == 0
    out = capsys.readouterr().out  # validation lines, then the best validation record as JSON
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [0, 2]
    assert json.loads(out[out.index("\n{") + 1:])["step"] == max(log, key=lambda r: r["score"])["step"]
    _, meta = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert meta["training"]["seed"] == 3 and meta["training"]["loss"]["ssim"] == 0.5 and meta["training"]["steps"] == 2


def test_set_overrides_dotted_keys_with_yaml_values():
    cfg = {"train": {"steps": 10}, "teacher": {"name": "sage"}}
    for item in ("train.steps=50", "teacher.init=runs/x.safetensors", "distill.output=50.0", "palette=[[0, 0, 0]]"):
        set_entry(cfg, item)
    assert cfg == {"train": {"steps": 50}, "teacher": {"name": "sage", "init": "runs/x.safetensors"},
                   "distill": {"output": 50.0}, "palette": [[0, 0, 0]]}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        set_entry(cfg, "train.steps")
    with pytest.raises(SystemExit, match="not a section"):
        set_entry(cfg, "train.steps.x=1")


def test_difference_correlation_is_zero_when_each_source_explains_the_others_share():
    ir, vis = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    assert difference_correlation_loss(ir + vis, ir, vis).item() < 1e-5  # SCD = 2
    assert difference_correlation_loss(vis, ir, vis).item() > 0.5  # nothing of the IR added


@needs_data
@pytest.mark.parametrize("rule", ["max", "mix"])
def test_torch_metrics_match_the_reported_ones_on_a_real_pair(rule):
    ir, vis = (to_gray(cv2.imread(str(DATA / "tno" / d / "01.png")))[100:260, 200:400] for d in ("ir", "vi"))
    fused = np.maximum(ir, vis) if rule == "max" else np.clip(0.7 * ir + 0.6 * vis - 20, 0, 255)
    expected = fusion_metrics(ir, vis, fused, ("VIF", "Qabf", "SSIM", "SCD"))
    got = fusion_metrics_torch(*(torch.from_numpy(x / 255)[None, None] for x in (ir, vis, fused)))
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, rel=1e-6), name
    x = torch.from_numpy(np.stack([ir, vis, fused]) / 255).float()[:, None].requires_grad_(True)
    terms = fusion_loss(x[2:], x[:1], x[1:2], {"vif": 1.0, "qabf": 1.0, "ssim_metric": 1.0})
    assert terms["qabf"].item() == pytest.approx(1 - expected["Qabf"], rel=1e-4)
    terms["total"].backward()
    assert torch.isfinite(x.grad).all() and x.grad[2].abs().sum() > 0


@needs_data
def test_trainable_modules_train_and_the_rest_stays_bit_identical(tmp_path):
    cfg = small_msrs_config("training/configs/student_metrics.yaml", 2, 1, steps=3, batch=2)
    cfg["seed"] = 0
    start = load_checkpoint(cfg["init"])[0].state_dict()
    train(cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    changed = {k.split(".")[0] for k in start if not torch.equal(start[k], state[k])}
    assert changed == {"dec8", "dec4", "coeff_head"}  # BatchNorm statistics of the others included
    cfg["train"]["trainable"] = ["dec8", "decoder"]
    with pytest.raises(ValueError, match="no sub-module decoder"):
        train(cfg, tmp_path / "bad", progress=False)


def test_crops_carry_their_rows_in_the_whole_frame():
    rng = np.random.default_rng(2)
    samples = [Sample("s", rng.integers(0, 256, (76, 90), dtype=np.uint8),
                      rng.integers(0, 256, (76, 90, 3), dtype=np.uint8), None)]
    ds = CropDataset(samples, crop=32, length=20, seed=1, rows=True)
    frame = row_coordinates(torch.zeros(1, 1, 10, 12))[0]  # the whole 76-row frame's 1/8 grid: 10 rows
    for k in range(20):
        (window, _), rows = ds.draw(k)[2:], ds[k][-1]
        top = window[0].start
        assert rows.shape == (1, 4, 4)
        if top % 8 == 0:
            assert torch.allclose(rows, frame[:, top // 8:top // 8 + 4, :4])
        assert rows[0, 0, 0].item() == pytest.approx((top / 8 + 0.5) / 10)


def _object_sample(h=96, w=120):
    """A pair with a hot, bright 24 x 30 person at (30, 40): its box target, soft targets at 1/2 and weights."""
    rng = np.random.default_rng(5)
    ir = rng.integers(0, 60, (h, w), dtype=np.uint8)
    ir[30:54, 40:70] = 230
    target = np.zeros((h, w), np.uint8)
    target[30:54, 40:70] = 1
    soft = np.zeros((4, h // 2, w // 2), np.float16)
    soft[0] = 1.0
    soft[:, 15:27, 20:35] = np.array([0, 1, 0, 0], np.float16)[:, None, None]
    return Sample("s", ir, np.dstack([ir] * 3), target, [(0, 40, 30, 70, 54)], soft,
                  np.ones((h // 2, w // 2), np.float16), 2)


def _within_a_pixel(mask: np.ndarray, reference: np.ndarray) -> bool:
    """Whether ``mask`` holds ``reference`` eroded by one pixel and lies inside it dilated by one."""
    kernel, ref = np.ones((3, 3), np.uint8), reference.astype(np.uint8)
    inner, outer = cv2.erode(ref, kernel, borderType=cv2.BORDER_REPLICATE) > 0, cv2.dilate(ref, kernel) > 0
    return bool(mask[inner].all() and not mask[~outer].any())


def test_neutral_augmentation_gives_the_crops_without_it():
    s = _object_sample()
    plain = TeacherCropDataset([s], crop=32, length=12, seed=4, rows=True, balanced=True)
    neutral = TeacherCropDataset([s], crop=32, length=12, seed=4, rows=True, balanced=True,
                                 augment={"scale": [1, 1], "gamma": [1, 1], "contrast": [1, 1]})
    for k in range(12):
        for a, b in zip(plain[k], neutral[k]):
            assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_scale_augmentation_moves_targets_soft_targets_and_rows_with_the_image():
    s = _object_sample()
    big = rescaled(s, 1.25)
    assert big.ir.shape == (120, 150) and big.soft.shape == (4, 60, 75) and big.weight.shape == (60, 75)
    assert (big.target == 1).sum() == pytest.approx(1.25 ** 2 * (s.target == 1).sum(), rel=0.1)
    assert big.boxes[0][1:] == pytest.approx((50, 37.5, 87.5, 67.5))
    assert min(rescaled(s, 0.25, crop=64).ir.shape) >= 64  # never smaller than a crop
    ds = TeacherCropDataset([s], crop=32, length=30, seed=1, rows=True, balanced=True,
                            augment={"scale": [0.75, 1.25]})
    heights = set()
    for k in range(30):
        _, frame, (rows, _), _ = ds.draw(k)
        ir, _, _, target, soft, weight, row_map = ds[k]
        heights.add(frame.ir.shape[0])
        person = (target == 1).numpy()
        assert _within_a_pixel(ir[0].numpy() > 0.5, person)  # the class ids still lie on the object
        assert _within_a_pixel(soft[1].numpy() > 0.5, person[::2, ::2]) and bool((weight == 1).all())
        assert row_map[0, 0, 0].item() == pytest.approx((rows.start / 8 + 0.5) / -(-frame.ir.shape[0] // 8))
    assert len(heights) > 5


def test_photometric_jitter_changes_ir_and_visible_luminance_independently_and_keeps_the_chroma():
    rng = np.random.default_rng(6)
    ir = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    vis = np.dstack([ir, ir, np.clip(ir.astype(int) + 40, 0, 255).astype(np.uint8)])  # coloured, luminance ~ IR
    target = np.zeros((64, 64), np.uint8)
    plain = CropDataset([Sample("s", ir, vis, target)], crop=48, length=10, seed=2)
    jittered = CropDataset([Sample("s", ir, vis, target)], crop=48, length=10, seed=2,
                           augment={"gamma": [0.6, 1.6], "contrast": [0.6, 1.4]})
    independent = 0
    for k in range(10):
        (ir0, y0, c0, t0), (ir1, y1, c1, t1) = plain[k], jittered[k]
        assert torch.equal(t0, t1) and torch.equal(c0[1:], c1[1:]) and torch.equal(c1[:1], y1)
        assert (ir1 - ir0).abs().max() > 0.02 and (y1 - y0).abs().max() > 0.02
        for before, after in ((ir0, ir1), (y0, y1)):  # monotone: the order of the grey levels is kept
            assert bool((after.flatten()[before.flatten().argsort()].diff() >= -1e-6).all())
        independent += not torch.allclose(ir1 - ir0, y1 - y0, atol=0.05)
    assert independent >= 8


def test_augment_config_is_checked():
    assert check_augment(None) == {}
    with pytest.raises(ValueError, match="unknown blur"):
        check_augment({"blur": [1, 2]})
    with pytest.raises(ValueError, match="scale: expected"):
        check_augment({"scale": [1.2, 0.8]})


def test_unlabelled_entry_crops_only_feed_the_fusion_terms_at_their_share(tmp_path):
    _, cfg = teacher_run(tmp_path, "training/configs/joint_aug.yaml", width=8, seg_width=8, seg_context=8)
    rng = np.random.default_rng(7)
    for i in range(3):
        _write(tmp_path / "unlabelled" / "ir" / f"{i}.png", rng.integers(0, 256, (70, 90), dtype=np.uint8))
        _write(tmp_path / "unlabelled" / "vi" / f"{i}.png", rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    cfg["data"].append({"root": str(tmp_path / "unlabelled"), "layout": "pairs", "share": 0.25})
    cfg["train"].update(steps=10, batch=4, crop=64)
    labelled, unlabelled = crop_datasets(cfg)
    assert (len(labelled), len(unlabelled)) == (40, 10)
    for k in range(10):
        _, _, _, target, soft, weight, rows = unlabelled[k]
        assert bool((target == IGNORE).all()) and not weight.any() and rows.shape == (1, 8, 8)


def test_joint_fine_tune_trains_the_encoder_with_rows_and_chroma_and_lowers_the_segmentation_loss(tmp_path):
    init, cfg = teacher_run(tmp_path, "training/configs/joint.yaml", width=8, seg_width=8, seg_context=8,
                            seg_rows=1, seg_chroma=1, seg_context_depth=3)
    cfg["model"].update(width=8, seg_width=8, seg_context=8)
    cfg["train"].update(steps=40, batch=4, crop=64, val_every=40, lr=0.01, threads=1)
    train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    seg = [x["segmentation"] + x["soft"] for x in losses]
    assert np.mean(seg[-5:]) < 0.7 * np.mean(seg[:5])
    assert all(np.isfinite(x["preserve"]) for x in losses) and losses[0]["preserve"] < 1e-6  # starts at init
    start, state = init.state_dict(), torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    changed = {k.split(".")[0] for k in start if not torch.equal(start[k], state[k])}
    assert {"stem", "enc8", "seg8", "seg_chroma_conv", "seg_rows_conv", "dec4"} <= changed  # chroma fed: it trains
    assert load_checkpoint(tmp_path / "run" / "best.safetensors")[1]["training"]["loss"]["preserve"] > 0


def test_init_says_which_checkpoint_tensors_the_model_leaves_out(tmp_path, capsys):
    from ivf_ros.checkpoint import save_checkpoint
    from ivf_ros.model import FusionStudent

    hp = {"width": 8, "seg_width": 8, "seg_context": 8, "seg_context_depth": 3}
    path = save_checkpoint(tmp_path / "wide.safetensors", FusionStudent(**hp, seg_context16=8),
                           {"classes": ["background", "person", "bicycle", "car"], "palette": [[0, 0, 0]] * 4})
    assert init_from(FusionStudent(**hp), path) == []  # everything the smaller model has comes from the file
    assert "of its tensors are not in this model (seg16." in capsys.readouterr().out
    assert init_from(FusionStudent(**hp, seg_context16=8), path) == [] and capsys.readouterr().out == ""
