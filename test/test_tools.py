"""The `ivf fuse`, `ivf eval` and `ivf info` commands end to end on real shared pairs."""
import json
import shutil

import cv2
import numpy as np
import pytest

from helpers import copy_msrs, needs_msrs
from ivf_ros.cli import main

pytestmark = needs_msrs
STEMS = ["00008N", "00055D", "00537D"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return copy_msrs(tmp_path_factory.mktemp("pairs"), STEMS)


def test_fuse_writes_fused_images_labels_and_overlays(pairs, tmp_path):
    out, labels = tmp_path / "fused", tmp_path / "labels"
    assert main(["fuse", "--ir", str(pairs / "ir"), "--vis", str(pairs / "vi"), "--out", str(out),
                 "--labels-out", str(labels), "--device", "cpu"]) == 0
    classes = json.loads((labels / "classes.json").read_text())
    assert classes[:4] == ["background", "person", "bicycle", "car"]
    for stem in STEMS:
        vis = cv2.imread(str(pairs / "vi" / f"{stem}.png"))
        fused = cv2.imread(str(out / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(labels / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(labels / f"{stem}_color.png"), cv2.IMREAD_UNCHANGED)
        assert fused.shape == vis.shape and label.shape == vis.shape[:2] and overlay.shape == vis.shape
        assert label.max() < len(classes)
        assert not np.array_equal(fused, vis)  # the IR contributed


def test_fuse_refuses_unmatched_pairs_and_size_mismatch(pairs, tmp_path, capsys):
    ir = tmp_path / "ir"
    shutil.copytree(pairs / "ir", ir)
    cv2.imwrite(str(ir / "lonely.png"), np.zeros((8, 8), np.uint8))
    assert main(["fuse", "--ir", str(ir), "--vis", str(pairs / "vi"), "--out", str(tmp_path / "o")]) == 2
    assert "without a visible partner" in capsys.readouterr().err
    (ir / "lonely.png").unlink()
    small = cv2.imread(str(ir / "00008N.png"), cv2.IMREAD_UNCHANGED)[::2, ::2]
    cv2.imwrite(str(ir / "00008N.png"), small)
    assert main(["fuse", "--ir", str(ir), "--vis", str(pairs / "vi"), "--out", str(tmp_path / "o")]) == 2
    assert "--resize" in capsys.readouterr().err
    assert main(["fuse", "--ir", str(ir), "--vis", str(pairs / "vi"), "--out", str(tmp_path / "o"), "--resize"]) == 0
    assert cv2.imread(str(tmp_path / "o" / "00008N.png")).shape == (480, 640, 3)


def test_eval_reports_model_and_trivial_fusions_and_box_scores(pairs, tmp_path, capsys):
    report_path = tmp_path / "new" / "r.json"  # a folder that does not exist yet
    assert main(["eval", "--ir", str(pairs / "ir"), "--vis", str(pairs / "vi"), "--boxes", str(pairs / "boxes"),
                 "--json", str(report_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| max |" in printed and "| person |" in printed
    report = json.loads(report_path.read_text())
    assert report["pairs"] == 3
    assert set(report["fusion"]) == {"model", "average", "max"}
    assert report["fusion"]["average"]["EN"] < report["fusion"]["max"]["EN"]
    person = report["segmentation"]["classes"]["person"]
    assert 0.0 <= report["segmentation"]["mean_f"] <= 1.0
    assert person["tp"] + person["fn"] > 0


def test_info_prints_the_shipped_metadata(capsys):
    assert main(["info"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "ivf_coeffnet"


def test_info_on_a_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_text("nope")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "x.safetensors" in err and "\n" not in err
