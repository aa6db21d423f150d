"""Registration: the one IR -> visible mapping every path applies, and its YAML file."""
import numpy as np
import pytest

from ivf_ros.registration import Registration, RegistrationError

H = np.array([[1.9, 0.05, -30.0], [-0.03, 2.0, 12.0], [1e-5, -2e-5, 1.0]])


def test_yaml_round_trip(tmp_path):
    reg = Registration(H, (640, 512), (1280, 1024), "auto-homography", 1.25, confidence=0.9)
    path = reg.save(tmp_path / "h.yaml")
    back = Registration.load(path)
    assert np.allclose(back.matrix, H, rtol=0, atol=1e-12)
    assert back.ir_size == (640, 512) and back.vis_size == (1280, 1024)
    assert back.method == "auto-homography"
    assert back.residual_px == pytest.approx(1.25) and back.confidence == pytest.approx(0.9)
    # old files (no confidence / sizes) still load
    (tmp_path / "old.yaml").write_text("homography: [[1, 0, 5], [0, 1, -3], [0, 0, 1]]\n")
    old = Registration.load(tmp_path / "old.yaml")
    assert old.confidence is None and old.ir_size is None and old.matrix[0, 2] == 5


def test_bad_files(tmp_path):
    with pytest.raises(RegistrationError, match="no such"):
        Registration.load(tmp_path / "missing.yaml")
    (tmp_path / "a.yaml").write_text("homography: [[1, 0], [0, 1]]\n")
    with pytest.raises(RegistrationError, match="3x3"):
        Registration.load(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("homography: [[0, 0, 0], [0, 0, 0], [0, 0, 1]]\n")
    with pytest.raises(RegistrationError, match="singular"):
        Registration.load(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("homography: [[1, 0, 0], [0, 1, 0], [0, 0, 1]]\nconfidence: high\n")
    with pytest.raises(RegistrationError, match="confidence"):
        Registration.load(tmp_path / "c.yaml")
    with pytest.raises(RegistrationError, match="9 numbers"):
        Registration.from_flat([1, 0, 0, 0, 1, 0, 0, 0])
    assert np.allclose(Registration.from_flat(H.ravel()).matrix, H)


def test_apply_identity_resizes():
    ir = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert Registration().apply(ir, (3, 4)) is ir
    assert Registration().apply(ir, (6, 8)).shape == (6, 8)


def test_apply_maps_points_and_rescales():
    reg = Registration(H, (640, 512), (1280, 1024))
    ir = np.zeros((512, 640), np.float32)
    x, y = 300, 200
    ir[y - 2:y + 3, x - 2:x + 3] = 1.0
    out = reg.apply(ir, (1024, 1280))
    (px, py), = reg.transform_points([(x, y)], ir.shape, out.shape)
    ys, xs = np.nonzero(out > 0.5)
    assert abs(xs.mean() - px) < 1.0 and abs(ys.mean() - py) < 1.0
    # the same registration on half-resolution streams lands on the same place, scaled
    small = reg.apply(ir[::2, ::2], (512, 640))
    ys2, xs2 = np.nonzero(small > 0.5)
    assert abs(xs2.mean() * 2 - xs.mean()) < 2.5 and abs(ys2.mean() * 2 - ys.mean()) < 2.5
