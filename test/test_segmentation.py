"""Segmentation: the MFNet teacher against its references, the teacher-label cache, the box-consistent label rule,
the new head, a short distillation run and the fine-tune command."""
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ivf_ros.checkpoint import load_checkpoint, save_checkpoint
from ivf_ros.data import data_root, read_ir, read_vis
from ivf_ros.model import FusionStudent, local_average, row_coordinates
from training.datasets import IGNORE, Sample, TeacherCropDataset
from training.finetune import main as finetune_main
from training.label_cache import build_cache, read_cache, soft_targets
from training.label_rule import box_consistent_target, rule_labels
from training.losses import hard_target_options, segmentation_loss, soft_segmentation_loss
from training.mfnet import MFNET_CLASSES, MFNet, load_mfnet, teacher_dir, teacher_logits
from training.train import FUSION_MODULES, freeze, load_config, load_split, train

CLASSES = ["background", "person", "bicycle", "car"]
TEACHER = teacher_dir()
needs_teacher = pytest.mark.skipif(not (TEACHER / "reference" / "reference.json").is_file(),
                                   reason=f"MFNet teacher not found at {TEACHER} (../shared/teachers/mfnet)")


@needs_teacher
def test_mfnet_reproduces_the_reference_class_maps():
    model = load_mfnet()
    reference = json.loads((TEACHER / "reference" / "reference.json").read_text())
    for stem, ref in reference.items():
        ir = read_ir(data_root() / "msrs" / "ir" / f"{stem}.png")
        vis = read_vis(data_root() / "msrs" / "vi" / f"{stem}.png")
        logits = teacher_logits(model, ir, vis)
        labels = logits.argmax(0).numpy()
        expected = cv2.imread(str(TEACHER / "reference" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert (labels != expected).mean() < 1e-4, stem
        assert np.bincount(labels.ravel(), minlength=9).tolist() == pytest.approx(ref["class_pixels"], abs=30)
        assert logits.mean().item() == pytest.approx(ref["logit_mean"], abs=1e-4)
        assert logits.std().item() == pytest.approx(ref["logit_std"], abs=1e-4)


def _random_mfnet(path):
    torch.manual_seed(0)
    model = MFNet().eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"classes": json.dumps(MFNET_CLASSES)})
    return model


def test_mfnet_any_size_and_refuses_other_classes(tmp_path):
    model = _random_mfnet(tmp_path / "m.safetensors")
    ir = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    vis = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert teacher_logits(model, ir, vis).shape == (9, 40, 50)  # padded to 48 x 64, cropped back
    loaded = load_mfnet(tmp_path / "m.safetensors")
    assert torch.equal(teacher_logits(loaded, ir, vis), teacher_logits(model, ir, vis))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata={"classes": '["a"]'})
    with pytest.raises(ValueError, match="not MFNet"):
        load_mfnet(tmp_path / "bad.safetensors")


def test_label_cache_round_trip(tmp_path):
    model = _random_mfnet(tmp_path / "m.safetensors")
    rng = np.random.default_rng(2)
    pairs = tmp_path / "pairs"
    for d in ("ir", "vi"):
        (pairs / d).mkdir(parents=True)
    for stem in ("a", "b"):
        cv2.imwrite(str(pairs / "ir" / f"{stem}.png"), rng.integers(0, 256, (48, 64), dtype=np.uint8))
        cv2.imwrite(str(pairs / "vi" / f"{stem}.png"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    out = tmp_path / "cache"
    assert build_cache(pairs, out, scale=2, weights=tmp_path / "m.safetensors", progress=False) == 2
    probs = read_cache(out, "a")
    assert probs.shape == (4, 24, 32)
    assert np.abs(probs.sum(0) - 1).max() <= 4 / 255  # probabilities, quantised to 1/255 per class
    ir, vis = read_ir(pairs / "ir" / "a.png"), read_vis(pairs / "vi" / "a.png")
    direct = soft_targets(teacher_logits(model, ir, vis), CLASSES, 2)
    assert np.array_equal(np.round(probs * 255).astype(np.uint8), direct)
    assert build_cache(pairs, out, scale=2, weights=tmp_path / "m.safetensors", progress=False) == 0  # cached
    assert read_cache(out, "missing") is None
    with pytest.raises(ValueError, match="other classes or scale"):
        build_cache(pairs, out, scale=4, weights=tmp_path / "m.safetensors", progress=False)


def _teacher(h=40, w=60):
    probs = np.zeros((4, h, w), np.float32)
    probs[0] = 1.0
    return probs


def test_rule_moves_teacher_pixels_far_from_their_boxes_to_background():
    probs = _teacher()
    probs[:, 5:10, 5:10] = [[[0.0]], [[1.0]], [[0.0]], [[0.0]]]  # a person blob at x 10-20 (full resolution)
    probs[:, 5:10, 40:45] = [[[0.1]], [[0.9]], [[0.0]], [[0.0]]]  # one inside the person box
    boxes = [(0, 76, 6, 94, 24)]  # full-resolution person box around the second blob
    soft, weight = box_consistent_target(probs, boxes, None, scale=2, margin=4, fill="ignore")
    assert (soft[1, 5:10, 5:10] == 0).all() and (soft[0, 5:10, 5:10] == 1).all()
    assert np.allclose(soft[:, 5:10, 40:45], probs[:, 5:10, 40:45])  # covered box: the teacher stays
    assert (weight == 1).all()
    unchanged, w = box_consistent_target(probs, None, None, scale=2)  # no box file: the teacher as it is
    assert np.array_equal(unchanged, probs) and (w == 1).all()


def test_rule_fills_empty_boxes_hot_rect_or_ignore():
    probs = _teacher()
    ir = np.full((40, 60), 30, np.uint8)
    ir[12:18, 12:16] = 220  # the hot object inside the box (cache resolution)
    boxes = [(0, 20, 20, 40, 40), (2, 80, 40, 100, 60)]  # an empty person box and an empty car box
    soft, weight = box_consistent_target(probs, boxes, ir, scale=2, fill=["hot", "rect", "rect"])
    labels = rule_labels(soft, weight)
    box = labels[10:20, 10:20]
    assert (labels[12:18, 12:16] == 1).all() and (box == 1).sum() == 24  # only the hot pixels are person
    assert ((box == IGNORE) | (box == 1)).all()  # the rest of the box gets no loss
    car = labels[20:30, 40:50]
    assert (car[1:9, 1:9] == 3).all() and (car[0] == IGNORE).all()  # box minus its border band
    assert (labels[30:, :] == 0).all()  # outside every box: background
    soft, weight = box_consistent_target(probs, boxes, ir, scale=2, fill="ignore")
    assert (weight[10:20, 10:20] == 0).all() and (soft.argmax(0) == 0).all()
    with pytest.raises(ValueError, match="fill"):
        box_consistent_target(probs, boxes, ir, scale=2, fill=["hot"])


def test_soft_loss_is_lowest_at_the_target_and_ignores_zero_weight():
    soft = torch.zeros(1, 4, 8, 8)
    soft[:, 1] = 1.0
    good, bad = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    good[:, 1], bad[:, 2] = 10.0, 10.0
    weight = torch.ones(1, 8, 8)
    assert soft_segmentation_loss(good, soft, weight) < 1e-3 < soft_segmentation_loss(bad, soft, weight)
    assert soft_segmentation_loss(bad, soft, torch.zeros(1, 8, 8)).item() == 0.0


def test_hard_example_mining_keeps_only_the_worst_labelled_pixels():
    target = torch.zeros(1, 2, 4, dtype=torch.long)
    target[0, 1] = 1
    target[0, 0, 3] = IGNORE
    logits = torch.zeros(1, 2, 2, 4)
    logits[0, 0] = torch.tensor([[4.0, 2.0, 0.0, -9.0], [3.0, 1.0, -1.0, -2.0]])  # class 0 wins on the left
    per_pixel = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")[target != IGNORE]
    worst = per_pixel.sort(descending=True).values
    assert torch.isclose(segmentation_loss(logits, target, hardest=1.0), per_pixel.mean())
    assert torch.isclose(segmentation_loss(logits, target, hardest=0.43), worst[:3].mean())  # 3 of the 7 labelled
    weights = torch.tensor([1.0, 2.0])  # a class weight scales its pixels' loss, not their rank
    w = weights[target[target != IGNORE]]
    top = per_pixel.topk(3).indices
    assert torch.isclose(segmentation_loss(logits, target, weights, hardest=0.43),
                         (per_pixel * w)[top].sum() / w[top].sum())
    assert segmentation_loss(logits, torch.full_like(target, IGNORE), hardest=0.5).item() == 0.0
    assert hard_target_options({"class_weights": [1, 2], "hardest": 0.3})[1] == 0.3
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="loss.hardest"):
            hard_target_options({"hardest": bad})


@pytest.mark.parametrize("hp", [{}, {"seg_width": 16}, {"seg_width": 16, "seg_depth": 2},
                                {"seg_width": 16, "seg_context": 8, "seg_rows": 1},
                                {"seg_width": 16, "seg_context": 8, "seg_context_depth": 3, "seg_chroma": 1}])
def test_head_shapes_fold_and_hyper_parameters(hp):
    model = FusionStudent(width=8, **hp)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64))
    model.eval()
    ir, vis = torch.rand(1, 1, 50, 70), torch.rand(1, 1, 50, 70)
    with torch.no_grad():
        fused, logits, small, feats = model.forward_with_head(ir, vis)
        assert logits.shape == (1, 4, 50, 70) and small.shape[-2:] == feats.shape[-2:]
        ref = model(ir, vis)
        folded = FusionStudent(width=8, **hp)
        folded.load_state_dict(model.state_dict())
        out = folded.eval().fold_batchnorm()(ir, vis)
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, atol=1e-4)
    assert FusionStudent(**model.hyper_parameters()).hyper_parameters() == model.hyper_parameters()
    assert model.hyper_parameters() == {"num_classes": 4, "width": 8, **hp, **({"seg_depth": 1} if hp and
                                                                               "seg_depth" not in hp else {})}


def test_row_channel_tells_the_head_where_in_the_frame_it_is():
    assert torch.allclose(row_coordinates(torch.zeros(2, 5, 4, 3))[:, 0, :, 0], torch.tensor([0.125, 0.375, 0.625,
                                                                                                 0.875]).expand(2, 4))
    torch.manual_seed(0)
    model = FusionStudent(width=8, seg_width=8, seg_context=8, seg_rows=1).eval()
    enc = {"dec8_in": torch.zeros(1, 48, 8, 8), "f4": torch.zeros(1, 16, 16, 16)}
    with torch.no_grad():
        logits = model.head_logits(enc)[0]
        top_rows = model.head_logits({**enc, "rows": torch.zeros(1, 1, 8, 8)})[0]
    assert not torch.allclose(logits[:, 4:6, 4:12], logits[:, 10:12, 4:12])  # flat input: only the row differs
    assert torch.allclose(top_rows[:, 4:6, 4:12], top_rows[:, 10:12, 4:12])
    with pytest.raises(ValueError, match="seg_rows"):
        FusionStudent(width=8, seg_width=8, seg_rows=1)


def test_chroma_input_reaches_the_labels_and_neutral_chroma_equals_none():
    torch.manual_seed(0)
    model = FusionStudent(width=8, seg_width=8, seg_context=8, seg_chroma=1).eval()
    ir, vis = torch.rand(1, 1, 48, 64), torch.rand(1, 1, 48, 64)
    red = torch.stack([torch.full((48, 64), 0.7), torch.full((48, 64), 0.4)])[None]
    with torch.no_grad():
        fused, logits = model(ir, vis)
        fused_red, logits_red = model(ir, vis, red)
        assert torch.equal(model(ir, vis, torch.full_like(red, 0.5))[1], logits)
        assert model.encode(ir, vis, red)["chroma"].shape[-2:] == (6, 8)
    assert torch.equal(fused, fused_red) and not torch.allclose(logits, logits_red)
    with pytest.raises(ValueError, match="seg_chroma"):
        FusionStudent(width=8, seg_width=8, seg_chroma=1)


def test_frozen_fusion_keeps_the_fused_image_while_the_head_learns():
    torch.manual_seed(0)
    model = FusionStudent(width=8, seg_width=16)
    ir, vis = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        before, logits_before = model(ir, vis)
    model.train()
    freeze(model, FUSION_MODULES)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        _, logits = model(ir, vis)
        loss = torch.nn.functional.cross_entropy(logits, torch.ones(2, 32, 32, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after, logits_after = model(ir, vis)
    assert torch.equal(before, after)
    assert not torch.equal(logits_before, logits_after)


def _scene(rng, h=96, w=128):
    """A night-like pair with two hot people; their YOLO boxes; and a teacher that sees only the first."""
    ir = rng.integers(20, 50, (h, w), dtype=np.uint8)
    vis = rng.integers(10, 40, (h, w, 3), dtype=np.uint8)
    people = [(int(rng.integers(5, 50)), int(rng.integers(10, 50))), (int(rng.integers(70, 110)), 40)]
    probs = _teacher(h // 2, w // 2)
    boxes = []
    for k, (x, y) in enumerate(people):
        ir[y:y + 30, x:x + 12] = rng.integers(200, 255, (30, 12))
        boxes.append(f"0 {(x + 6) / w} {(y + 15) / h} {14 / w} {32 / h}")
        if k == 0:
            probs[:, y // 2:(y + 30) // 2, x // 2:(x + 12) // 2] = [[[0.1]], [[0.9]], [[0.0]], [[0.0]]]
    return ir, vis, boxes, probs


def teacher_run(tmp_path, config: str, **hyper):
    """(init student, config): ``config`` read and pointed at a written teacher dataset (``write_teacher_dataset``)
    and at a saved random student with ``hyper`` (its fusion coefficients perturbed, so fusion is not max)."""
    cache = write_teacher_dataset(tmp_path / "data")
    torch.manual_seed(0)
    init = FusionStudent(**hyper)
    torch.nn.init.normal_(init.coeff_head.weight, std=0.1)
    save_checkpoint(tmp_path / "init.safetensors", init, {"classes": CLASSES, "palette": [[0, 0, 0]] * 4,
                                                         "training": {"data": "test"}})
    cfg = load_config(config)
    cfg.update(init=str(tmp_path / "init.safetensors"),
               data=[{"root": str(tmp_path / "data"), "layout": "pairs", "split": "train",
                      "teacher_cache": str(cache)}],
               val={"root": str(tmp_path / "data"), "layout": "pairs", "split": "val"})
    return init, cfg


def write_teacher_dataset(root, n=8, seed=0):
    """``n`` crafted pairs (``_scene``) with boxes under ``root`` and their teacher cache (returned)."""
    rng = np.random.default_rng(seed)
    cache = root / "cache"
    for d in ("ir", "vi", "boxes", "cache"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ir, vis, boxes, probs = _scene(rng)
        cv2.imwrite(str(root / "ir" / f"{i:03d}.png"), ir)
        cv2.imwrite(str(root / "vi" / f"{i:03d}.png"), vis)
        (root / "boxes" / f"{i:03d}.txt").write_text("\n".join(boxes) + "\n")
        np.savez_compressed(cache / f"{i:03d}.npz", probs=np.round(probs * 255).astype(np.uint8))
    (cache / "cache.json").write_text(json.dumps({"teacher": "crafted", "classes": CLASSES, "scale": 2}))
    return cache


def test_short_distillation_lowers_the_segmentation_loss(tmp_path):
    cache = write_teacher_dataset(tmp_path / "data")
    cfg = load_config("training/configs/segmentation.yaml")
    cfg.update(init=None, data=[{"root": str(tmp_path / "data"), "layout": "pairs", "split": "train",
                                 "teacher_cache": str(cache)}],
               val={"root": str(tmp_path / "data"), "layout": "pairs", "split": "val"})
    cfg["model"].update(seg_width=16, seg_rows=0, seg_chroma=0)
    cfg["train"].update(steps=40, batch=4, crop=64, val_every=40, lr=0.01, threads=1)
    torch.manual_seed(0)
    train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    seg = [x["segmentation"] + x["soft"] for x in losses]
    assert np.mean(seg[-5:]) < 0.7 * np.mean(seg[:5])
    _, meta = load_checkpoint(tmp_path / "run" / "best.safetensors")
    teacher = meta["training"]["segmentation_teacher"]
    assert teacher["teacher"] == "crafted" and teacher["label_rule"]["fill"] == ["hot", "rect", "rect"]
    assert meta["hyper_parameters"]["seg_width"] == 16 and "mean_f" in meta["validation"]


def test_head_fit_on_cached_features_lowers_the_loss_and_keeps_the_fusion(tmp_path):
    from training.fit_head import fit_head

    init, cfg = teacher_run(tmp_path, "training/configs/segmentation.yaml", width=8)
    cfg["head_fit"] = {"epochs": 30, "batch": 2, "crop": 64, "lr": 0.01, "val_every": 30}
    cfg["model"].update(width=8, seg_width=8, seg_context=8)
    best = fit_head(cfg, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    seg = [x["segmentation"] + x["soft"] for x in log if "soft" in x]
    assert np.mean(seg[-3:]) < 0.5 * np.mean(seg[:3])
    model, meta = load_checkpoint(tmp_path / "run" / "best.safetensors")
    fused = {k: v for k, v in init.state_dict().items() if k.split(".")[0] in FUSION_MODULES}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fused.items())
    assert meta["training"]["segmentation_teacher"]["teacher"] == "crafted" and "mean_f" in best
    assert meta["training"]["head_fit"] == {**cfg["head_fit"], "epoch": 30}  # the recipe travels with the head


def test_teacher_crops_align_soft_targets_with_the_image():
    rng = np.random.default_rng(3)
    ir = rng.integers(0, 256, (64, 80), dtype=np.uint8)
    soft = np.zeros((4, 32, 40), np.float16)
    soft[1, :, :20] = 1.0  # left half person, at 1/2
    target = np.zeros((64, 80), np.uint8)
    target[:, :40] = 1
    s = Sample("s", ir, np.dstack([ir] * 3), target, [], soft, np.ones((32, 40), np.float16), 2)
    ds = TeacherCropDataset([s], crop=32, length=20, seed=0, scale=2)
    for k in range(20):
        _, _, _, t, sc, w = ds[k]
        assert sc.shape == (4, 16, 16) and w.shape == (16, 16)
        assert torch.equal(sc[1], (t[::2, ::2] == 1).float())  # same pixels, flipped or not


def test_finetune_command_on_generated_label_images(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "own"
    for d in ("ir", "vi", "Label"):
        (root / d).mkdir(parents=True)
    for i in range(4):
        ir = rng.integers(20, 60, (64, 64), dtype=np.uint8)
        label = np.zeros((64, 64), np.uint8)
        x = int(rng.integers(5, 40))
        ir[10:50, x:x + 14] = 230
        label[10:50, x:x + 14] = 2  # MSRS id 2: person
        cv2.imwrite(str(root / "ir" / f"{i}.png"), ir)
        cv2.imwrite(str(root / "vi" / f"{i}.png"), np.dstack([ir] * 3))
        cv2.imwrite(str(root / "Label" / f"{i}.png"), label)
    out = tmp_path / "run"
    assert finetune_main([str(root), "--layout", "msrs", "--epochs", "2", "--out", str(out),
                          "--set", "head_fit.crop=64", "head_fit.batch=2"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    validations = [r for r in log if "score" in r]
    assert [r["epoch"] for r in validations] == [2] and "person_f" in validations[0]  # boxes of the label regions
    model, meta = load_checkpoint(out / "best.safetensors")
    assert meta["training"]["freeze_fusion"] is True and "msrs layout" in meta["training"]["segmentation_targets"]


def test_calibration_offsets_raise_the_judge_on_the_given_pairs():
    from training.calibrate import calibrate

    model = FusionStudent(width=8, seg_width=8).eval()
    with torch.no_grad():
        model.seg_head.weight.zero_()
        model.seg_head.bias.copy_(torch.tensor([0.6, 0.0, -5.0, -5.0]))  # background everywhere, person close
    rng = np.random.default_rng(5)
    samples = [Sample(str(i), rng.integers(0, 256, (64, 64), dtype=np.uint8),
                      rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), None, [(0, 0, 0, 64, 40)])
               for i in range(2)]
    bias, before, after = calibrate(model, samples, CLASSES, rounds=1)
    assert before == 0.0 and after > 1.0  # person labelled everywhere: precision 40/64, recall 1
    assert bias[1] > 0.6 and bias[0] == 0.0


def _fold_head(path, bias, hold_out, offsets=None, root=None):
    """A head whose logits are its bias everywhere, saved as fitted on ``root`` (default: the folder beside
    ``path`` named data) with ``hold_out`` (and calibrated by ``offsets``, included in ``bias``)."""
    model = FusionStudent(width=8, seg_width=8).eval()
    with torch.no_grad():
        model.seg_head.weight.zero_()
        model.seg_head.bias.copy_(torch.tensor(bias))
    meta = {"classes": CLASSES, "palette": [[0, 0, 0]] * 4,
            "training": {"data": [{"root": str(root or path.parent / "data"), "split": "train",
                                   "hold_out": hold_out}]}}
    if offsets:
        meta["training"]["head_bias_offsets"] = {"offsets": offsets}
    return save_checkpoint(path, model, meta)


def test_fold_calibration_scores_each_pair_with_the_head_that_did_not_see_it(tmp_path):
    from training.calibrate import held_out_logits, main as calibrate_main

    write_teacher_dataset(tmp_path / "data")
    entry = {"root": str(tmp_path / "data"), "layout": "pairs", "split": "train"}
    samples = load_split(entry, CLASSES)
    kept = load_split({**entry, "hold_out": [1, 2]}, CLASSES)  # fold 1 of 2: positions 1, 3, ... left out
    assert [s.stem for s in kept] == [s.stem for s in samples[0::2]]
    for bad in ([2, 2], [0, 1], [0.5, 2], [True, 2], "0/2"):
        with pytest.raises(ValueError, match="hold_out"):
            load_split({**entry, "hold_out": bad}, CLASSES)
    folds = [_fold_head(tmp_path / f"fold{k}.safetensors", [float(k), 0.0, -5.0, -5.0], [k, 2]) for k in (0, 1)]
    hyper = load_checkpoint(folds[0])[0].hyper_parameters()
    root = str(tmp_path / "data")
    logits = held_out_logits([str(f) for f in folds], samples, hyper, root)
    assert [float(l[0].mean()) for l in logits] == pytest.approx([i % 2 for i in range(len(samples))], abs=1e-5)
    calibrated = _fold_head(tmp_path / "cal0.safetensors", [1.0, 0.0, -5.0, -5.0], [0, 2], offsets=[1.0, 0, 0, 0])
    logits = held_out_logits([str(calibrated), str(folds[1])], samples, hyper, root)  # fold 0's offsets taken off
    assert [float(l[0].mean()) for l in logits] == pytest.approx([i % 2 for i in range(len(samples))], abs=1e-5)
    with pytest.raises(ValueError, match="not a fold head 0 of 2"):
        held_out_logits([str(folds[1]), str(folds[0])], samples, hyper, root)
    elsewhere = _fold_head(tmp_path / "other.safetensors", [0.0, 0.0, -5.0, -5.0], [0, 2], root=tmp_path / "x")
    with pytest.raises(ValueError, match="not a fold head 0 of 2"):  # fitted on other pairs: not held out here
        held_out_logits([str(elsewhere), str(folds[1])], samples, hyper, root)
    # the head labels background everywhere (its own logits would call for +1 on person), the fold heads person
    # everywhere (no offset beats that): the offsets follow the fold heads
    head = _fold_head(tmp_path / "head.safetensors", [0.0, -0.5, -5.0, -5.0], None)
    for k in (0, 1):
        _fold_head(folds[k], [0.0, 0.5, -5.0, -5.0], [k, 2])
    args = [str(head), "--data", str(tmp_path / "data"), "--folds", *map(str, folds)]
    assert calibrate_main(args + ["--out", str(tmp_path / "cal.safetensors")]) == 0
    model, meta = load_checkpoint(tmp_path / "cal.safetensors")
    offsets = meta["training"]["head_bias_offsets"]
    assert "fold heads" in offsets["method"] and offsets["offsets"][1] == 0.0
    again_args = [str(tmp_path / "cal.safetensors"), *args[1:], "--out", str(tmp_path / "again.safetensors")]
    assert calibrate_main(again_args) == 0
    again, meta2 = load_checkpoint(tmp_path / "again.safetensors")  # calibrating again replaces, not adds
    assert torch.equal(again.seg_head.bias, model.seg_head.bias) and meta2["training"]["head_bias_offsets"]["replaced"]


@pytest.mark.parametrize("pool", [{}, {"seg_context16_pool": 5}])
def test_context16_branch_builds_folds_round_trips_and_is_absent_when_off(tmp_path, pool):
    from training.fit_head import crop_at

    hp = {"seg_width": 8, "seg_depth": 1, "seg_context": 8, "seg_context_depth": 3, "seg_rows": 1, "seg_chroma": 1}
    torch.manual_seed(0)
    model = FusionStudent(width=8, **hp, seg_context16=12, **pool)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64))  # BatchNorm statistics that folding must keep
    model.eval()
    ir, vis, chroma = torch.rand(1, 1, 50, 70), torch.rand(1, 1, 50, 70), torch.rand(1, 2, 50, 70)
    meta = {"classes": CLASSES, "palette": [[0, 0, 0]] * 4, "training": {"data": "test"}}
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model, meta))
    assert loaded.hyper_parameters() == {"num_classes": 4, "width": 8, **hp, "seg_context16": 12, **pool}
    with torch.no_grad():
        fused, logits, small, feats = model.forward_with_head(ir, vis, chroma)
        assert logits.shape == (1, 4, 50, 70) and small.shape[-2:] == feats.shape[-2:] == (13, 18)
        assert torch.equal(loaded(ir, vis, chroma)[1], logits)
        assert torch.allclose(loaded.fold_batchnorm()(ir, vis, chroma)[1], logits, atol=1e-4)
        model.seg16[1][0].weight.zero_()  # the branch reaches the labels
        assert not torch.allclose(model(ir, vis, chroma)[1], logits)
    assert "seg_context16" not in FusionStudent(width=8, **hp).hyper_parameters()
    with pytest.raises(ValueError, match="seg_context16"):
        FusionStudent(width=8, seg_width=8, seg_context=8, seg_context_depth=1, seg_context16=8)
    with pytest.raises(ValueError, match="seg_context16_pool 4"):
        FusionStudent(width=8, **hp, seg_context16=8, seg_context16_pool=4)
    rng = np.random.default_rng(0)
    target = np.zeros((96, 128), np.uint8)
    target[40:60, 50:70] = 1
    s = Sample("s", target, np.dstack([target] * 3), target, [])
    assert all(c % 16 == 0 for _ in range(20) for c in crop_at(s, 48, rng, align=16))


def test_local_average_is_the_average_over_the_pixels_inside():
    x = torch.rand(2, 3, 9, 12)
    assert torch.allclose(local_average(x, torch.ones(3, 1, 5, 5)), F.avg_pool2d(x, 5, 1, 2, count_include_pad=False), atol=1e-6)
