"""The synthetic night street: deterministic, realistic value ranges, moving objects, two camera clocks."""
import numpy as np
import pytest

from ivf_ros.data import read_yolo_boxes
from ivf_ros.synthetic import BICYCLE, CAR, PERSON, NightStreet, render_sequence, yolo_lines


@pytest.fixture(scope="module")
def scene():
    return NightStreet(width=160, height=120, seed=3)


def test_same_seed_same_frames_other_seed_differs(scene):
    again = NightStreet(width=160, height=120, seed=3)
    other = NightStreet(width=160, height=120, seed=4)
    assert np.array_equal(scene.ir_frame(0.5, 7), again.ir_frame(0.5, 7))
    assert np.array_equal(scene.vis_frame(0.5, 7), again.vis_frame(0.5, 7))
    assert scene.boxes(0.5) == again.boxes(0.5)
    assert not np.array_equal(scene.vis_frame(0.5, 7), other.vis_frame(0.5, 7))


def test_ir_is_raw_16_bit_with_warm_people(scene):
    ir = scene.ir_frame(0.0)
    assert ir.dtype == np.uint16 and ir.shape == (120, 160)
    background = float(np.median(ir))
    assert 7000 <= background <= 9000
    people = [b for b in scene.boxes(0.0) if b[0] == PERSON]
    assert people
    for _, x0, y0, x1, y1 in people:
        patch = ir[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        assert patch.max() > background + 700  # bodies are clearly hotter than the street


def test_ir_has_temporal_and_fixed_pattern_noise(scene):
    a, b = scene.ir_frame(0.0, 0).astype(float), scene.ir_frame(0.0, 1).astype(float)
    temporal = np.std(a - b) / np.sqrt(2)
    assert 5 < temporal < 40  # sensor noise in counts
    sky = scene.ir_frame(0.0, 2)[:6].astype(float)  # flat region: column offsets show as column structure
    assert np.std(sky.mean(axis=0)) > 3


def test_visible_is_dim_and_people_barely_visible(scene):
    vis = scene.vis_frame(0.0)
    assert vis.dtype == np.uint8 and vis.shape == (120, 160, 3)
    assert vis.mean() < 60
    ir = scene.ir_frame(0.0).astype(float)
    gray = vis.astype(float).mean(axis=2)
    for _, x0, y0, x1, y1 in (b for b in scene.boxes(0.0) if b[0] == PERSON):
        inside = (slice(int(y0), int(np.ceil(y1))), slice(int(x0), int(np.ceil(x1))))
        ir_contrast = (ir[inside].max() - np.median(ir)) / (np.percentile(ir, 99.5) - np.percentile(ir, 0.5))
        vis_contrast = (np.percentile(gray[inside], 90) - np.median(gray)) / 255.0
        assert vis_contrast < ir_contrast


def test_objects_move_and_all_classes_appear(scene):
    classes = {b[0] for t in np.linspace(0, 3, 7) for b in scene.boxes(t)}
    assert {PERSON, BICYCLE, CAR} <= classes
    cars0 = [b for b in scene.boxes(0.0) if b[0] == CAR]
    cars1 = [b for b in scene.boxes(0.2) if b[0] == CAR]
    assert cars0 and cars1 and cars0 != cars1
    for _, x0, y0, x1, y1 in scene.boxes(1.0):
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120


def test_two_camera_clocks():
    scene = NightStreet(width=96, height=72, seed=1)
    ir, vis = render_sequence(scene, duration=1.0, ir_rate=30, vis_rate=25, vis_offset=0.004, jitter=0.0)
    assert len(ir) == 30 and len(vis) == 25
    assert vis[0].stamp == pytest.approx(0.004)
    assert np.allclose(np.diff([f.stamp for f in ir]), 1 / 30)
    assert np.allclose(np.diff([f.stamp for f in vis]), 1 / 25)
    assert ir[0].image.dtype == np.uint16 and vis[0].image.dtype == np.uint8
    with pytest.raises(ValueError):
        render_sequence(scene, duration=0)


def test_yolo_lines_round_trip(tmp_path, scene):
    boxes = scene.boxes(0.4)
    path = tmp_path / "f.txt"
    path.write_text(yolo_lines(boxes, 160, 120))
    back = read_yolo_boxes(path, 160, 120)
    assert [b[0] for b in back] == [b[0] for b in boxes]
    assert np.allclose([b[1:] for b in back], [b[1:] for b in boxes], atol=1e-3)
