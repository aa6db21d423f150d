"""Calibration: point fitting, automatic cross-modal estimation (and its refusal), overlays, the CLI."""
import argparse

import cv2
import numpy as np
import pytest

from ivf_ros import calibration as C
from ivf_ros.data import data_root, read_ir, read_vis
from ivf_ros.registration import Registration
from ivf_ros.tools import calibrate as calibrate_tool

DATA = data_root()
needs_data = pytest.mark.skipif(not (DATA / "misaligned").is_dir(),
                                reason=f"shared data not found at {DATA} (set IVF_DATA)")

H_TRUE = np.array([[1.12, 0.04, 23.0], [-0.03, 1.08, -11.0], [2e-5, -1e-5, 1.0]])


def corner_error(H_est, H_ref, w, h):
    pts = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1], [w / 2, h / 2]], float)
    return float(np.abs(C.project(H_est, pts) - C.project(H_ref, pts)).max())


def scene(h=360, w=480, seed=0):
    """A synthetic 'visible' scene of shapes and the matching 'thermal' one with other intensities per shape."""
    rng = np.random.default_rng(seed)
    vis = np.full((h, w), 0.5, np.float32)
    ir = np.full((h, w), 0.3, np.float32)
    for _ in range(40):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        a, b = int(rng.integers(8, 60)), int(rng.integers(8, 60))
        v, t = float(rng.uniform()), float(rng.uniform())
        if rng.uniform() < 0.5:
            cv2.rectangle(vis, (x, y), (x + a, y + b), v, -1)
            cv2.rectangle(ir, (x, y), (x + a, y + b), t, -1)
        else:
            cv2.circle(vis, (x, y), a // 2, v, -1)
            cv2.circle(ir, (x, y), a // 2, t, -1)
    vis += rng.normal(0, 0.02, vis.shape).astype(np.float32)
    ir = cv2.GaussianBlur(ir, (0, 0), 1.2) + rng.normal(0, 0.02, ir.shape).astype(np.float32)
    return np.clip(ir * 255, 0, 255).astype(np.uint8), np.clip(vis * 255, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ point correspondences

@pytest.mark.parametrize("model", ["homography", "affine"])
def test_exact_recovery_from_points(model):
    rng = np.random.default_rng(1)
    H = H_TRUE.copy()
    if model == "affine":
        H[2] = [0, 0, 1]
    ir_pts = rng.uniform([0, 0], [640, 512], (30, 2))
    vis_pts = C.project(H, ir_pts)
    M, inl, rms = C.fit_points(ir_pts, vis_pts, model)
    assert inl.all() and rms < 1e-6
    assert np.allclose(M, H, atol=1e-7, rtol=1e-7)
    # gross outliers are rejected and the rest still recovers the mapping exactly
    vis_bad = vis_pts.copy()
    vis_bad[:5] += rng.uniform(40, 80, (5, 2))
    M2, inl2, rms2 = C.fit_points(ir_pts, vis_bad, model)
    assert not inl2[:5].any() and inl2[5:].all() and rms2 < 1e-6
    assert corner_error(M2, H, 640, 512) < 1e-4


def test_minimal_and_degenerate_points():
    pts = np.array([[0, 0], [100, 0], [100, 80], [0, 80]], float)
    M, _, rms = C.fit_points(pts, C.project(H_TRUE, pts), "homography")
    assert corner_error(M, H_TRUE, 640, 512) < 1e-6
    with pytest.raises(C.CalibrationError, match="at least 4"):
        C.fit_points(pts[:3], pts[:3], "homography")
    line = np.array([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]], float)
    with pytest.raises(C.CalibrationError):
        C.fit_points(line, line * 2, "affine")


def test_points_csv_yaml_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    ir_pts = rng.uniform([0, 0], [640, 512], (12, 2))
    vis_pts = C.project(H_TRUE, ir_pts)
    csv_path = tmp_path / "pts.csv"
    csv_path.write_text("ir_x,ir_y,vis_x,vis_y\n# a comment\n"
                        + "".join(f"{a:.9f},{b:.9f},{c:.9f},{d:.9f}\n" for (a, b), (c, d) in zip(ir_pts, vis_pts)))
    a, b = C.read_points_csv(csv_path)
    reg, info = C.calibrate_from_points(a, b, (640, 512), (800, 600))
    loaded = Registration.load(reg.save(tmp_path / "h.yaml"))
    assert loaded.method == "points-homography" and loaded.vis_size == (800, 600) and loaded.ir_size == (640, 512)
    assert corner_error(loaded.matrix, H_TRUE, 640, 512) < 1e-5
    assert loaded.residual_px < 1e-4
    (tmp_path / "bad.csv").write_text("1,2,3\n")
    with pytest.raises(C.CalibrationError, match="expected 4 values"):
        C.read_points_csv(tmp_path / "bad.csv")


def test_masked_ncc_finds_shift():
    rng = np.random.default_rng(3)
    fixed = cv2.GaussianBlur(rng.uniform(size=(80, 100)).astype(np.float32), (0, 0), 2)
    moving = fixed[20:60, 30:90].copy()
    ncc, (oy, ox) = C.masked_ncc(fixed, moving)
    iy, ix = np.unravel_index(np.argmax(ncc), ncc.shape)
    assert (iy - oy, ix - ox) == (20, 30) and ncc.max() > 0.99


# ------------------------------------------------------------------------------------------ automatic estimation

def test_auto_on_synthetic_cross_modal_scene():
    ir_a, vis = scene()
    # the IR camera sees the scene at another scale and position: ir = warp(ir_aligned, A)
    A = np.array([[0.8, 0.0, 20.0], [0.0, 0.8, 15.0], [0, 0, 1.0]])
    ir = cv2.warpPerspective(ir_a, A, (400, 320))
    reg, info = C.calibrate_auto([(ir, vis)])
    assert corner_error(reg.matrix, np.linalg.inv(A), 400, 320) < 1.5
    assert info["confidence"] > 0.5
    # the saved residual is the final mapping's (check patches that agree with it), not the patch fit's
    assert reg.residual_px == pytest.approx(info["residual_px"], abs=1e-4) and reg.residual_px < 1.5


def test_auto_pools_several_pairs_of_one_rig(tmp_path):
    # two scenes seen by the same rig; the CLI takes the two folders and pools their evidence
    A = np.array([[0.9, 0.0, 12.0], [0.0, 0.9, 8.0], [0, 0, 1.0]])
    for k in range(2):
        ir_a, vis = scene(240, 320, seed=10 + k)
        for sub, img in (("ir", cv2.warpPerspective(ir_a, A, (300, 220))), ("vis", vis)):
            (tmp_path / sub).mkdir(exist_ok=True)
            cv2.imwrite(str(tmp_path / sub / f"f{k}.png"), img)
    rc = _cli(["--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vis"), "--out", str(tmp_path / "h.yaml"),
               "--model", "affine"])
    assert rc == 0
    reg = Registration.load(tmp_path / "h.yaml")
    assert reg.method == "auto-affine" and reg.ir_size == (300, 220) and reg.vis_size == (320, 240)
    assert corner_error(reg.matrix, np.linalg.inv(A), 300, 220) < 1.5


G_WARP = np.array([[0.9, 0.03, 30.0], [-0.02, 0.92, 20.0], [3e-5, 1e-5, 1.0]])


def grid(w, h, margin=40):
    gx, gy = np.meshgrid(np.linspace(margin, w - margin, 9), np.linspace(margin, h - margin, 7))
    return np.c_[gx.ravel(), gy.ravel()]


@needs_data
def test_auto_recovers_known_homography_same_modality_exactly():
    # real thermal content warped by a known homography, registered onto the unwarped frame: exact recovery
    ir_a = read_ir(DATA / "misaligned" / "msrs" / "ir" / "00099D.png")
    h, w = ir_a.shape[:2]
    ir = cv2.warpPerspective(ir_a, G_WARP, (w, h))
    reg, info = C.calibrate_auto([(ir, ir_a)])
    pts = C.project(G_WARP, grid(w, h, 80))  # warped-IR pixels of points inside both frames
    err = np.linalg.norm(C.project(reg.matrix, pts) - C.project(np.linalg.inv(G_WARP), pts), axis=1)
    # (within a pixel: the prior on the perspective terms pulls this warp's 3e-5 terms slightly towards zero)
    assert err.max() < 1.0, (err.max(), info)
    assert reg.method == "auto-homography"


@needs_data
def test_auto_recovers_known_homography_on_real_cross_modal_pair():
    # a real aligned IR/visible pair (RoadScene), the IR warped by a known homography: the estimate from the
    # warped IR to the visible image must undo the warp (to the accuracy of the data set's own alignment, ~1 px)
    ir_a = read_ir(DATA / "misaligned" / "roadscene" / "ir" / "19.png")
    vis = read_vis(DATA / "misaligned" / "roadscene" / "vi" / "19.png")
    h, w = ir_a.shape[:2]
    ir = cv2.warpPerspective(ir_a, G_WARP, (w, h))
    reg, info = C.calibrate_auto([(ir, vis)])
    pts = grid(w, h)  # visible pixels
    err = np.linalg.norm(C.project(reg.matrix, C.project(G_WARP, pts)) - pts, axis=1)
    assert np.median(err) < 2.0 and err.max() < 5.0, (np.median(err), err.max(), info)
    assert info["confidence"] >= 0.5
    # without the warp the estimate is close to identity: the method follows the known warp, nothing else
    reg0, _ = C.calibrate_auto([(ir_a, vis)])
    err0 = np.linalg.norm(C.project(reg.matrix, C.project(G_WARP, pts)) - C.project(reg0.matrix, pts), axis=1)
    assert err0.max() < 3.0


@needs_data
def test_refuses_unrelated_images():
    ir = read_ir(DATA / "misaligned" / "msrs" / "ir_warp" / "00004N.png")
    vis = read_vis(DATA / "misaligned" / "roadscene" / "vi" / "35.png")
    with pytest.raises(C.CalibrationError, match="too little structure"):
        C.calibrate_auto([(ir, vis)])


def test_refuses_featureless_images():
    rng = np.random.default_rng(4)
    ir = (rng.normal(128, 3, (240, 320))).clip(0, 255).astype(np.uint8)
    vis = np.full((240, 320, 3), 90, np.uint8)
    with pytest.raises(C.CalibrationError, match="too little structure"):
        C.calibrate_auto([(ir, vis)])


# ------------------------------------------------------------------------------------------ scores, overlay, CLI

def test_edge_alignment_prefers_the_right_mapping():
    ir, vis = scene(seed=5)
    good = C.edge_alignment(ir, vis)
    shifted = C.edge_alignment(np.roll(ir, 9, axis=1), vis)
    assert good > 0.5 and good > shifted + 0.3


def test_overlay_written(tmp_path):
    ir, vis = scene(seed=6)
    reg = Registration(np.array([[1.0, 0, 3.0], [0, 1.0, -2.0], [0, 0, 1]]), (480, 360), (480, 360))
    path = C.write_overlay(tmp_path / "o" / "overlay.png", ir, cv2.cvtColor(vis, cv2.COLOR_GRAY2BGR), reg)
    img = cv2.imread(str(path))
    assert img is not None and img.ndim == 3 and img.shape[0] == 360 and img.shape[1] > 2 * 480
    # checkerboard: IR (colour-mapped) tiles and visible tiles alternate on the left half
    left = img[:, :480].astype(int)
    from_ir = (np.abs(left - vis[..., None].astype(int)) > 12).any(axis=2)
    assert 0.3 < from_ir.mean() < 0.7
    tile = 360 // 8
    assert from_ir[5:tile - 5, tile + 5:2 * tile - 5].mean() > 0.6  # second tile of the first row is IR
    assert from_ir[5:tile - 5, 5:tile - 5].mean() < 0.3  # the first is the visible image


def _cli(argv):
    p = argparse.ArgumentParser()
    calibrate_tool.add_arguments(p)
    return calibrate_tool.run(p.parse_args(argv))


def test_cli_points_writes_yaml_and_overlay(tmp_path):
    ir, vis = scene(seed=7)
    cv2.imwrite(str(tmp_path / "ir.png"), ir)
    cv2.imwrite(str(tmp_path / "vis.png"), vis)
    pts = np.array([[10, 10], [400, 20], [420, 300], [30, 330], [200, 180]], float)
    A = np.array([[1.0, 0.0, 4.0], [0.0, 1.0, -3.0], [0, 0, 1.0]])
    rows = "".join(f"{a},{b},{c},{d}\n" for (a, b), (c, d) in zip(pts, C.project(A, pts)))
    (tmp_path / "p.csv").write_text("ir_x,ir_y,vis_x,vis_y\n" + rows)
    rc = _cli(["--ir", str(tmp_path / "ir.png"), "--vis", str(tmp_path / "vis.png"), "--out",
               str(tmp_path / "h.yaml"), "--points", str(tmp_path / "p.csv"), "--model", "affine"])
    assert rc == 0
    reg = Registration.load(tmp_path / "h.yaml")
    assert np.allclose(reg.matrix, A, atol=1e-6) and reg.method == "points-affine"
    assert cv2.imread(str(tmp_path / "h_overlay.png")) is not None


def test_cli_refusal_exit_code(tmp_path, capsys):
    rng = np.random.default_rng(8)
    cv2.imwrite(str(tmp_path / "ir.png"), rng.normal(128, 2, (200, 260)).clip(0, 255).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "vis.png"), np.full((200, 260, 3), 77, np.uint8))
    rc = _cli(["--ir", str(tmp_path / "ir.png"), "--vis", str(tmp_path / "vis.png"), "--out",
               str(tmp_path / "h.yaml")])
    assert rc == calibrate_tool.EXIT_REFUSED
    assert "too little structure" in capsys.readouterr().err
    assert not (tmp_path / "h.yaml").exists()


def test_eval_tool_on_a_small_fake_data_tree(tmp_path):
    from ivf_ros.tools import registration_eval
    import json
    root = tmp_path / "data"
    ir, vis = scene(seed=12)
    A = np.array([[1.03, 0.01, -6.0], [-0.01, 1.02, 5.0], [0, 0, 1.0]])
    for sub, img in (("ir", ir), ("ir_warp", cv2.warpPerspective(ir, A, (480, 360))), ("vi", vis)):
        (root / "misaligned" / "msrs" / sub).mkdir(parents=True)
        cv2.imwrite(str(root / "misaligned" / "msrs" / sub / "p1.png"), img)
    big_vis = cv2.resize(vis, (960, 720))[40:, 60:]  # other field of view: a plain resize misaligns
    for sub, img in (("ir_raw", ir), ("vi_hr", big_vis)):
        (root / "roadscene_unregistered" / sub).mkdir(parents=True)
        cv2.imwrite(str(root / "roadscene_unregistered" / sub / "f1.png"), img)
    p = argparse.ArgumentParser()
    registration_eval.add_arguments(p)
    out = tmp_path / "out"
    rc = registration_eval.run(p.parse_args(["--data", str(root), "--datasets", "msrs", "unregistered",
                                             "--out", str(out), "--overlays", "1"]))
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    ms, un = res["summary"]
    assert ms["dataset"] == "misaligned/msrs" and ms["mae_improved"] == 1 and ms["mae_after"] < ms["mae_before"]
    assert un["refused"] == 0 and un["edge_after"] > un["edge_before"]
    assert "misaligned/msrs" in (out / "table.md").read_text()
    assert (out / "overlays" / "unregistered_f1.png").is_file()


# ------------------------------------------------------------------------------------------ known answers, confidence

def periodic_scene(h=360, w=480, period=40, seed=0):
    """Identical windows on a regular grid (a facade, a fence): any shift by the period matches as well."""
    rng = np.random.default_rng(seed)
    vis = np.full((h, w), 0.35, np.float32)
    ir = np.full((h, w), 0.6, np.float32)
    for y in range(-period, h + period, period):
        for x in range(-period, w + period, period):
            cv2.rectangle(vis, (x + 8, y + 6), (x + 28, y + 30), 0.8, -1)
            cv2.rectangle(ir, (x + 8, y + 6), (x + 28, y + 30), 0.2, -1)
    vis += rng.normal(0, 0.02, vis.shape).astype(np.float32)
    ir = cv2.GaussianBlur(ir, (0, 0), 1.2) + rng.normal(0, 0.02, ir.shape).astype(np.float32)
    return np.clip(ir * 255, 0, 255).astype(np.uint8), np.clip(vis * 255, 0, 255).astype(np.uint8)


def test_refuses_a_confidently_wrong_answer(tmp_path, capsys):
    # repeated structure: the estimate lands one period (40 px) from the truth with every patch match consistent;
    # the answer must not come out as a confident one
    from ivf_ros.tools.registration_eval import grid_error
    ir, vis = periodic_scene()
    G = np.array([[1.0, 0, 43.0], [0, 1.0, 21.0], [0, 0, 1.0]])
    ir = cv2.warpPerspective(ir, G, (480, 360))
    reg, info = C.calibrate_auto([(ir, vis)], C.AutoConfig(min_confidence=0.0))
    mean, _ = grid_error(reg.matrix, np.linalg.inv(G), (480, 360))
    assert mean > 5.0 and info["inlier_ratio"] > 0.9  # wrong, and the patch evidence alone looks convincing
    assert info["confidence"] < 0.5
    with pytest.raises(C.CalibrationError, match="confidence"):
        C.calibrate_auto([(ir, vis)])
    cv2.imwrite(str(tmp_path / "ir.png"), ir)
    cv2.imwrite(str(tmp_path / "vis.png"), vis)
    rc = _cli(["--ir", str(tmp_path / "ir.png"), "--vis", str(tmp_path / "vis.png"), "--out", str(tmp_path / "h.yaml")])
    assert rc == calibrate_tool.EXIT_REFUSED and not (tmp_path / "h.yaml").exists()
    assert "refused" in capsys.readouterr().err


def test_ambiguity_sees_repeated_structure():
    # at the true mapping: a facade of identical windows matches as well one period away, a scene of shapes does not
    G = np.array([[1.0, 0, 43.0], [0, 1.0, 21.0], [0, 0, 1.0]])
    for (ir, vis), lo, hi in ((periodic_scene(), 0.9, 2.0), (scene(seed=3), 0.0, 0.8)):
        ir = cv2.warpPerspective(ir, G, (480, 360))
        assert lo < C.ambiguity(C._Frames([(ir, vis)]), np.linalg.inv(G)) < hi


def test_ambiguity_reads_the_frames_cache(monkeypatch):
    # the dense refinement's cached structure channels serve the uniqueness check: nothing is resized again, and
    # the result does not depend on what else the cache holds
    ir, vis = scene(seed=3)
    G = np.array([[1.0, 0, 43.0], [0, 1.0, 21.0], [0, 0, 1.0]])
    ir = cv2.warpPerspective(ir, G, (480, 360))
    fresh = C.ambiguity(C._Frames([(ir, vis)]), np.linalg.inv(G))
    frames = C._Frames([(ir, vis)])
    C.dense_refine(frames, np.linalg.inv(G), sides=(200, 256))
    def no_resize(*_):
        raise AssertionError("ambiguity recomputed structure channels the cache holds")
    monkeypatch.setattr(C, "_level_features", no_resize)
    monkeypatch.setattr(C, "_resize", no_resize)
    assert C.ambiguity(frames, np.linalg.inv(G)) == pytest.approx(fresh, abs=1e-9)


def test_mutual_information_prefers_the_aligned_image():
    from ivf_ros.tools.registration_eval import mutual_information
    ir, vis = scene(seed=9)
    a, b = ir.astype(np.float32) / 255, vis.astype(np.float32) / 255
    valid = np.ones(a.shape, bool)
    assert mutual_information(a, b, valid) > mutual_information(np.roll(a, 15, axis=1), b, valid) + 0.2


def test_mi_registration_finds_a_small_misalignment():
    # the independent reference of the known-answer evaluation: from the identity it finds a 3-px, 1% misalignment
    from ivf_ros.tools.registration_eval import mi_registration
    ir, vis = scene(seed=11)
    A = np.array([[1.01, 0.0, 3.0], [0.0, 1.01, -2.0], [0, 0, 1.0]])  # aligned IR px -> recorded IR px
    ir = cv2.warpPerspective(ir, A, (480, 360))
    assert C.grid_error(np.eye(3), np.linalg.inv(A), (480, 360))[0] > 3.0
    H, nmi = mi_registration(ir, vis, np.eye(3))
    assert C.grid_error(H, np.linalg.inv(A), (480, 360))[0] < 0.7 and nmi > 0.05
    assert mi_registration(ir, vis, np.eye(3), reach=0.002) is None  # the optimum lies beyond the reach


def test_random_homography_and_grid_error():
    from ivf_ros.tools.registration_eval import WARP_RANGES, grid_error, random_homography
    a = [random_homography(np.random.default_rng(3), 640, 480) for _ in range(2)]
    assert np.array_equal(a[0], a[1])  # a fixed seed gives the same warps
    rng = np.random.default_rng(4)
    c = np.array([[1.0, 0, 320], [0, 1.0, 240], [0, 0, 1.0]])
    for _ in range(50):
        G = random_homography(rng, 640, 480)
        P = np.linalg.inv(c) @ G @ c
        P /= P[2, 2]
        assert np.all(np.abs(P[2, :2]) <= WARP_RANGES["perspective"])
        s = np.sqrt(abs(np.linalg.det(P[:2, :2])))
        assert 0.89 < s < 1.16
        shift = C.project(G, [[320, 240]])[0] - [320, 240]
        assert np.all(np.abs(shift) <= 0.06 * np.array([640, 480]) + 1e-9)
    H = random_homography(rng, 640, 480)
    assert grid_error(H, H, (640, 480)) == (0.0, 0.0)
    T = np.array([[1.0, 0, 2.0], [0, 1.0, 0], [0, 0, 1.0]])
    mean, mx = grid_error(T @ H, H, (640, 480))
    assert mean == pytest.approx(2.0) and mx == pytest.approx(2.0)


def test_synthetic_warps_depend_only_on_seed_and_pair(tmp_path):
    from ivf_ros.tools.registration_eval import synthetic_tasks
    for folder, stems in (("a", ["p1", "p2", "p3"]), ("b", ["p1"])):
        for sub in ("ir", "vi"):
            (tmp_path / folder / sub).mkdir(parents=True)
            for stem in stems:
                cv2.imwrite(str(tmp_path / folder / sub / f"{stem}.png"), np.zeros((24, 32), np.uint8))
    warps = lambda tasks: {(t["dataset"], t["pair"]): t["warps"] for t in tasks}
    full = warps(synthetic_tasks([tmp_path / "a", tmp_path / "b"], 2, 7, None, "homography"))
    assert len(full) == 4 and full[("a", "p1")] != full[("b", "p1")] != full[("a", "p2")]
    alone = warps(synthetic_tasks([tmp_path / "a"], 2, 7, None, "homography", only=["p2"]))
    assert alone == {("a", "p2"): full[("a", "p2")]}
    assert warps(synthetic_tasks([tmp_path / "b"], 2, 8, None, "homography"))[("b", "p1")] != full[("b", "p1")]
    from ivf_ros.tools import registration_eval
    p = argparse.ArgumentParser()
    registration_eval.add_arguments(p)
    with pytest.raises(ValueError, match="no such pair.*b:p2"):
        registration_eval.run(p.parse_args(["--synthetic", str(tmp_path / "b"), "--pairs", "p1", "b:p2",
                                            "--out", str(tmp_path / "out")]))


@needs_data
def test_synthetic_evaluation_on_a_few_pairs(tmp_path):
    # the known-answer evaluation end to end on four real pairs (two MSRS, two RoadScene), one warp each
    import json
    from ivf_ros.tools import registration_eval
    picks = {"msrs": ["01603D", "00099D"], "roadscene": ["FLIR_00548", "FLIR_05005"]}
    for ds, stems in picks.items():
        for sub in ("ir", "vi"):
            (tmp_path / ds / sub).mkdir(parents=True)
            for stem in stems:
                src = next((DATA / ds / sub).glob(stem + ".*"))
                (tmp_path / ds / sub / src.name).symlink_to(src)
    p = argparse.ArgumentParser()
    registration_eval.add_arguments(p)
    out = tmp_path / "out"
    rc = registration_eval.run(p.parse_args(["--synthetic", str(tmp_path / "msrs"), str(tmp_path / "roadscene"),
                                             "--per-pair", "1", "--self-reference", "--overlays", "1",
                                             "--out", str(out)]))
    assert rc == 0
    res = json.loads((out / "synthetic.json").read_text())
    assert [s["dataset"] for s in res["summary"]] == ["msrs", "roadscene", "all"]
    assert res["summary"][-1]["cases"] == 4 and len(res["cases"]) == 4
    assert (out / "synthetic.md").is_file() and (out / "overlays" / "synthetic_msrs_00099D_0.png").is_file()
    for case in res["cases"]:
        assert case["answer"] and 0.0 <= case["confidence"] <= 1.0
        # against the same method on the unwarped pair the warp is undone to a pixel or two
        assert case["mean_px_vs_self"] < 2.5, case
    # FLIR_00548 is well aligned by the data set itself: the answer is close to the true mapping, accepted
    flir = next(c for c in res["cases"] if c["pair"] == "FLIR_00548")
    assert flir["mean_px"] < 2.0 and not flir["refused"], flir


def test_self_reference_refused_where_ivf_calibrate_would_refuse_it(tmp_path):
    # a logged run joined with a --per-pair 0 --self-reference log by --rescore: each case is scored against its
    # pair's own registration, unless ivf calibrate would refuse that one (unstable here): then the pair has none
    # and its cases are tabled apart, against the data set's alignment
    import json
    from ivf_ros.tools import registration_eval
    good = {"inliers": 60, "inlier_ratio": 0.9, "coarse_distinct": 10.0, "spread_px": 0.5, "scale": 1.0,
            "coverage": 0.5, "ambiguity": 0.5}
    G = np.array([[1.02, 0.0, 5.0], [0.0, 1.02, -3.0], [0, 0, 1.0]])  # the warp
    own = np.array([[1.0, 0.0, 4.0], [0.0, 1.0, 0.0], [0, 0, 1.0]])  # the pair's own registration: 4 px right
    answer = own @ np.linalg.inv(G)  # what the method answers on the warped IR: its own registration, undone
    rows = []
    for pair, evidence in (("steady", good), ("unstable", dict(good, spread_px=8.0))):
        rows.append({"dataset": "d", "pair": pair, "unwarped": True, "vis_wh": [320, 240], "own": own.ravel().tolist(),
                     "own_evidence": evidence, "reference": np.eye(3).ravel().tolist(), "mi": None})
        rows.append({"dataset": "d", "pair": pair, "case": 0, "answer": True, "warp": G.ravel().tolist(),
                     "matrix": answer.ravel().tolist(), "mean_px": 4.0, "max_px": 4.0, "seconds": 1.0, **good})
    log = tmp_path / "joined.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # references after their cases, as a cat gives
    p = argparse.ArgumentParser()
    registration_eval.add_arguments(p)
    assert registration_eval.run(p.parse_args(["--rescore", str(log), "--out", str(tmp_path / "out")])) == 0
    res = json.loads((tmp_path / "out" / "synthetic.json").read_text())
    cases = {c["pair"]: c for c in res["cases"]}
    assert len(cases) == 2 and len(res["unwarped"]) == 2
    assert not cases["steady"]["self_reference_refused"] and cases["steady"]["mean_px_vs_self"] < 1e-6
    assert cases["unstable"]["self_reference_refused"] and "mean_px_vs_self" not in cases["unstable"]
    md = (tmp_path / "out" / "synthetic.md").read_text()
    assert "1 of 2 pairs have none" in md and "against the data set's alignment (d:unstable)" in md
