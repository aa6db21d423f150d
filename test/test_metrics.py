"""Fusion metrics against the shared reference values, their basic properties, and the box scorer."""
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from ivf_ros.data import data_root
from ivf_ros.metrics import (FUSION_METRICS, BoxScorer, box_iou, f1_interval, fusion_metrics, mean_f_interval,
                             mean_interval, regions_to_boxes, to_gray)

REFERENCE = data_root().parent / "reference" / "fusion_metrics.json"


def _reference_cases():
    if not REFERENCE.is_file():
        return []
    return json.loads(REFERENCE.read_text())["cases"]


def _case_id(case):
    return f"{Path(case['ir']).parent.parent.name}-{Path(case['ir']).stem}-{case['fusion']}"


@pytest.mark.skipif(not REFERENCE.is_file(), reason=f"reference metrics not found at {REFERENCE}")
@pytest.mark.parametrize("case", _reference_cases(), ids=_case_id)
def test_reference_values(case):
    root = data_root()
    paths = [root / Path(case[key]).relative_to("data") for key in ("ir", "vis")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"shared data not found: {', '.join(missing)}")
    ir, vis = (to_gray(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)) for p in paths)
    # numpy rounding (half to even) is the reference's: half-up rounding of the average is off by about 3 %
    fused = {"avg": lambda: np.round((ir + vis) / 2), "max": lambda: np.maximum(ir, vis)}[case["fusion"]]()
    got = fusion_metrics(ir, vis, fused)
    assert set(got) == set(FUSION_METRICS) == set(case["values"])
    for name, expected in case["values"].items():
        assert got[name] == pytest.approx(expected, rel=1e-4), name


# ------------------------------------------------------------------------------------------------ gray conversion


def test_to_gray_uses_bgr_order_and_rounds():
    img = np.array([[[0, 0, 255], [0, 255, 0], [255, 0, 0], [7, 7, 7]]], dtype=np.uint8)  # red, green, blue, gray
    gray = to_gray(img)
    assert gray.dtype == np.float64
    np.testing.assert_array_equal(gray, [[76, 150, 29, 7]])


def test_to_gray_keeps_gray_images():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(to_gray(img), img)
    np.testing.assert_array_equal(to_gray(np.repeat(img[..., None], 3, axis=2)), img)


# ------------------------------------------------------------------------------------------------ metric properties


@pytest.fixture(scope="module")
def textured():
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (96, 128)), (0, 0), 2)
    return np.round(np.clip((noise - noise.min()) * 255 / np.ptp(noise), 0, 255))


def test_identical_images_score_perfectly(textured):
    m = fusion_metrics(textured, textured, textured)
    assert m["SSIM"] == pytest.approx(2.0)
    assert m["MS_SSIM"] == pytest.approx(1.0)
    assert m["CC"] == pytest.approx(1.0)
    assert m["VIF"] == pytest.approx(2.0)
    assert m["MI"] == pytest.approx(2 * m["EN"])
    assert m["PSNR"] == math.inf
    # Qabf saturates at the product of the two sigmoids' values for perfect preservation
    assert m["Qabf"] == pytest.approx(0.9994 / (1 + math.exp(-7.5)) * 0.9879 / (1 + math.exp(-22 * 0.2)))


def test_constant_fusion_carries_no_information(textured):
    m = fusion_metrics(textured, 255 - textured, np.full_like(textured, 128.0))
    for name in ("EN", "SD", "SF", "AG", "MI", "VIF", "CC"):
        assert m[name] == pytest.approx(0.0, abs=1e-12), name
    # zero padding gives even a constant image edges at its border, so Qabf is small, not zero
    assert m["Qabf"] < 0.5 * fusion_metrics(textured, 255 - textured, textured, names=("Qabf",))["Qabf"]


def test_single_image_metrics_closed_form():
    stripes = np.tile([0.0, 10.0], (40, 25))  # 40 x 50, columns alternate 0 / 10
    m = fusion_metrics(stripes, stripes, stripes, names=("EN", "SD", "SF"))
    assert m == pytest.approx({"EN": 1.0, "SD": 5.0, "SF": 10 * math.sqrt(49 / 50)})
    ramp = np.tile(3.0 * np.arange(50), (40, 1))
    assert fusion_metrics(ramp, ramp, ramp, names=("AG",))["AG"] == pytest.approx(
        math.sqrt(9 / 2) * 40 * 50 / (39 * 49)
    )


def test_fusion_metrics_selects_and_validates(textured):
    assert list(fusion_metrics(textured, textured, textured, names=("PSNR", "EN"))) == ["PSNR", "EN"]
    with pytest.raises(ValueError, match="unknown metric"):
        fusion_metrics(textured, textured, textured, names=("NIQE",))
    with pytest.raises(ValueError, match="one size"):
        fusion_metrics(textured, textured[1:], textured)
    with pytest.raises(ValueError, match="gray"):
        fusion_metrics(textured, textured, np.dstack([textured] * 3))


def test_small_images_use_the_scales_that_fit(textured):
    # 96 px: MS-SSIM has 4 of its 5 levels (the 5th would be 6 px, under the 11 px window), VIF all of its 4
    noisy = np.clip(textured + np.random.default_rng(1).normal(0, 20, textured.shape), 0, 255)
    m = fusion_metrics(textured, textured, noisy, names=("SSIM", "MS_SSIM", "VIF"))
    assert all(np.isfinite(v) for v in m.values())
    assert 0 < m["MS_SSIM"] < 1 and 0 < m["SSIM"] < 2 and 0 < m["VIF"] < 2
    tiny = textured[:30, :30]
    assert 0 < fusion_metrics(tiny, tiny, noisy[:30, :30], names=("VIF",))["VIF"] < 2
    with pytest.raises(ValueError, match="too small"):
        fusion_metrics(tiny[:16], tiny[:16], tiny[:16])


def test_psnr_of_known_error():
    a = np.zeros((32, 32))
    m = fusion_metrics(a, a + 10, a + 5, names=("PSNR",))
    assert m["PSNR"] == pytest.approx(10 * math.log10(255**2 / 25))


# ------------------------------------------------------------------------------------------------ box scoring

CLASSES = ["background", "person", "bicycle", "car"]
PERSON, CAR = 0, 2  # YOLO classes; label ids are one more


def _labels(*regions, shape=(60, 80)):
    """Label map with (label_id, x0, y0, x1, y1) rectangles painted in order."""
    labels = np.zeros(shape, np.uint8)
    for class_id, x0, y0, x1, y1 in regions:
        labels[y0:y1, x0:x1] = class_id
    return labels


def _score(labels, boxes):
    scorer = BoxScorer(CLASSES)
    scorer.add(labels, boxes)
    return scorer.summary()


def test_perfect_match():
    s = _score(_labels((1, 20, 10, 40, 30), (3, 50, 40, 70, 55)), [(PERSON, 20, 10, 40, 30), (CAR, 50, 40, 70, 55)])
    assert set(s) == {"person", "bicycle", "car"}
    for name in ("person", "car"):
        assert s[name] == {"tp": 1, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "coverage": 1.0,
                           "px_precision": 1.0, "box_recall": 1.0, "f": 1.0, "false_ppm": 0.0}
    assert s["bicycle"]["tp"] == s["bicycle"]["fp"] == s["bicycle"]["fn"] == 0


def test_missed_box():
    s = _score(_labels(), [(PERSON, 20, 10, 40, 30)])["person"]
    assert (s["tp"], s["fp"], s["fn"]) == (0, 0, 1)
    assert s["recall"] == 0.0 and s["coverage"] == 0.0


def test_false_region():
    s = _score(_labels((1, 20, 10, 40, 30), (1, 60, 40, 70, 50)), [(PERSON, 20, 10, 40, 30)])["person"]
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["precision"] == 0.5 and s["recall"] == 1.0
    assert s["f1"] == pytest.approx(2 / 3)


def test_shifted_region_below_iou_threshold():
    box = (20, 10, 40, 30)
    shifted = (32, 10, 52, 30)  # overlap 8 x 20 of 20 x 20 boxes: IoU 160 / 640
    assert box_iou(box, shifted) == pytest.approx(0.25)
    s = _score(_labels((1, *shifted)), [(PERSON, *box)])["person"]
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1)
    assert s["coverage"] == pytest.approx(160 / 400)


def test_coverage_counts_only_the_box_class():
    # the person box is half person, half car
    s = _score(_labels((1, 20, 10, 40, 30), (3, 20, 20, 40, 30)), [(PERSON, 20, 10, 40, 30)])
    assert s["person"]["coverage"] == pytest.approx(0.5)
    assert s["car"]["fp"] == 1


def test_matching_is_one_to_one():
    region = (1, 20, 10, 40, 30)
    s = _score(_labels(region), [(PERSON, 20, 10, 40, 30), (PERSON, 20, 11, 40, 30)])["person"]
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1)


def test_scores_accumulate_over_images():
    scorer = BoxScorer(CLASSES)
    scorer.add(_labels((1, 20, 10, 40, 30)), [(PERSON, 20, 10, 40, 30)])
    scorer.add(_labels(), [(PERSON, 5, 5, 15, 15)])
    s = scorer.summary()["person"]
    assert (s["tp"], s["fn"]) == (1, 1)
    assert s["coverage"] == pytest.approx(0.5)


def test_judge_precision_counts_pixels_inside_grown_boxes():
    # 20x20 person box; the labelled 30x20 region overlaps the box grown by 4 px in 24x20 pixels
    s = _score(_labels((1, 20, 10, 50, 30)), [(PERSON, 20, 10, 40, 30)])["person"]
    assert s["px_precision"] == pytest.approx(24 * 20 / (30 * 20))
    assert s["box_recall"] == 1.0
    assert s["f"] == pytest.approx(2 * 0.8 / 1.8)
    outside = 60 * 80 - 28 * 28  # pixels outside the grown box
    assert s["false_ppm"] == pytest.approx(1e6 * 6 * 20 / outside)


def test_judge_recall_needs_a_fifth_of_the_box():
    boxes = [(CAR, 0, 0, 10, 10), (CAR, 40, 20, 50, 30)]
    # first box 20% labelled (a hit), second 19% (a miss)
    labels = _labels((3, 0, 0, 10, 2), shape=(60, 80))
    labels[20:21, 40:50] = 3
    labels[21, 40:49] = 3
    s = _score(labels, boxes)["car"]
    assert s["box_recall"] == 0.5
    assert s["px_precision"] == 1.0 and s["false_ppm"] == 0.0


def test_judge_other_class_inside_a_box_is_false_area_and_mean_f():
    scorer = BoxScorer(CLASSES)
    scorer.add(_labels((3, 20, 10, 40, 30)), [(PERSON, 20, 10, 40, 30), (CAR, 60, 40, 70, 50)])
    s = scorer.summary()
    assert s["person"]["f"] == 0.0 and s["person"]["box_recall"] == 0.0
    assert s["car"]["px_precision"] == 0.0 and s["car"]["box_recall"] == 0.0
    assert s["car"]["false_ppm"] == pytest.approx(1e6 * 400 / (60 * 80 - 18 * 18))
    scorer.add(_labels((1, 20, 10, 40, 30)), [(PERSON, 20, 10, 40, 30)])  # accumulates: person 1 of 2 boxes
    s = scorer.summary()
    assert s["person"]["box_recall"] == 0.5 and s["person"]["px_precision"] == 1.0
    assert scorer.mean_f() == pytest.approx((2 * 0.5 / 1.5 + 0 + 0) / 3)


def test_regions_to_boxes_uses_8_connectivity_and_min_area():
    labels = _labels((2, 10, 10, 15, 15), (2, 15, 15, 20, 20), (2, 50, 50, 53, 53))  # diagonal touch; 9 px blob
    assert regions_to_boxes(labels, 2) == [(10.0, 10.0, 20.0, 20.0)]
    assert sorted(regions_to_boxes(labels, 2, min_area=5)) == [(10.0, 10.0, 20.0, 20.0), (50.0, 50.0, 53.0, 53.0)]
    assert regions_to_boxes(labels, 1) == []


def test_box_of_unknown_class_is_rejected():
    with pytest.raises(ValueError, match="class 5"):
        BoxScorer(CLASSES).add(_labels(), [(5, 0, 0, 10, 10)])


def test_f1_interval_brackets_the_f1_and_pairs_images():
    good = np.zeros((40, 40), np.uint8)
    good[10:30, 10:30] = 1  # finds the box
    box = [(0, 10, 10, 30, 30)]
    a, b = BoxScorer(CLASSES), BoxScorer(CLASSES)
    for i in range(20):
        a.add(good if i % 2 else np.zeros_like(good), box)  # finds half of the persons
        b.add(good if i % 4 == 1 else np.zeros_like(good), box)  # finds a quarter, a subset of a's
    f1 = a.summary()["person"]["f1"]
    lo, hi = f1_interval(a, "person")
    assert lo < f1 < hi and 0.0 <= lo and hi <= 1.0
    d_lo, d_hi = f1_interval(a, "person", reference=b)
    assert 0.0 < d_lo <= d_hi  # a is never worse on any image: the paired difference stays positive
    assert f1_interval(a, "person", reference=a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        f1_interval(a, "person", reference=BoxScorer(CLASSES))


def test_mean_f_interval_brackets_the_mean_f_and_pairs_images():
    good = np.zeros((40, 40), np.uint8)
    good[10:30, 10:30] = 1  # the person box, exactly
    box = [(0, 10, 10, 30, 30)]
    a, b = BoxScorer(CLASSES), BoxScorer(CLASSES)
    for i in range(20):
        a.add(good if i % 2 else np.zeros_like(good), box)  # finds half of the persons, precision 1
        b.add(good if i % 4 == 1 else np.zeros_like(good), box)  # a quarter, a subset of a's
    assert a.mean_f() == pytest.approx((2 * 0.5 / 1.5) / 3)  # person F 2/3; bicycle and car 0 (no boxes)
    lo, hi = mean_f_interval(a)
    assert lo < a.mean_f() < hi and 0.0 <= lo and hi <= 1.0
    d_lo, d_hi = mean_f_interval(a, reference=b)
    assert 0.0 < d_lo <= d_hi  # never worse on any image
    assert mean_f_interval(a, reference=a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        mean_f_interval(a, reference=BoxScorer(CLASSES))


def test_mean_interval_of_paired_differences():
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.3, 50)  # large spread between images ...
    better = base + 0.01 + rng.normal(0.0, 0.002, 50)  # ... a small, consistent gain on every one
    lo, hi = mean_interval(better)
    assert lo < better.mean() < hi and hi - lo > 0.1  # the mean's interval: as wide as the spread says
    d_lo, d_hi = mean_interval(better, reference=base)
    assert 0 < d_lo < (better - base).mean() < d_hi < d_lo + 0.002  # paired: the small gain is resolved
    with pytest.raises(ValueError, match="same images"):
        mean_interval(better, reference=base[:10])
