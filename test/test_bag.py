"""rosbag2 make / eval / replay: round trips in both storage formats, sync statistics, damaged bags, the live node."""
import json
import shutil

import cv2
import numpy as np
import pytest

from ivf_ros import bag
from ivf_ros.data import data_root, find_pairs

N_PAIRS = 4
SIZE = (160, 120)
MSRS = data_root() / "msrs"


@pytest.fixture(scope="module")
def pipeline():
    from ivf_ros.pipeline import FusionPipeline

    return FusionPipeline(device="cpu")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """A few MSRS pairs (with their boxes), downscaled so the tests stay fast."""
    if not (MSRS / "ir").is_dir():
        pytest.skip(f"shared data not found at {MSRS} (set IVF_DATA)")
    root = tmp_path_factory.mktemp("pairs")
    for sub in ("ir", "vi", "boxes"):
        (root / sub).mkdir()
    for pair in find_pairs(MSRS / "ir", MSRS / "vi")[:: 285 // N_PAIRS][:N_PAIRS]:
        cv2.imwrite(str(root / "ir" / pair.ir.name), cv2.resize(cv2.imread(str(pair.ir), 0), SIZE))
        cv2.imwrite(str(root / "vi" / pair.vis.name), cv2.resize(cv2.imread(str(pair.vis)), SIZE))
        box = MSRS / "boxes" / f"{pair.stem}.txt"
        if box.is_file():
            shutil.copy(box, root / "boxes" / box.name)
    return root


def read_topics(path):
    """{topic: [deserialised messages]} of a bag."""
    ts = bag.typestore()
    reader = bag.open_bag(path)
    try:
        out = {}
        for conn, _, raw in reader.messages():
            out.setdefault(conn.topic, []).append(ts.deserialize_cdr(raw, conn.msgtype))
        return out
    finally:
        reader.close()


def array_streams(n_ir, n_vis, rate=10.0, offset=0.02, skip_vis=(), size=(64, 48)):
    """Camera streams of plain arrays with exact stamps; visible frames in ``skip_vis`` are missing."""
    rng = np.random.default_rng(0)
    ir = [rng.integers(7000, 9000, size[::-1], dtype=np.uint16) for _ in range(n_ir)]
    vis = [rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8) for _ in range(n_vis)]
    vis_idx = [i for i in range(n_vis) if i not in skip_vis]
    return [
        bag.CameraStream(bag.IR_TOPIC, "ir", [i / rate for i in range(n_ir)], ir, is_ir=True),
        bag.CameraStream(bag.VIS_TOPIC, "vis", [offset + i / rate for i in vis_idx], [vis[i] for i in vis_idx]),
    ]


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_make_then_eval_round_trip(tmp_path, pairs_dir, pipeline, storage):
    from ivf_ros.cli import main

    src = tmp_path / "in"
    assert main(["bag", "make", "--ir", str(pairs_dir / "ir"), "--vis", str(pairs_dir / "vi"), "--out", str(src),
                 "--rate", "10", "--ir-encoding", "mono16", "--jitter-ms", "2", "--storage", storage]) == 0
    written = read_topics(src)
    assert {t: len(m) for t, m in written.items()} == {
        "/ir/image": N_PAIRS, "/ir/camera_info": N_PAIRS, "/visible/image": N_PAIRS, "/visible/camera_info": N_PAIRS}
    assert written["/ir/image"][0].encoding == "mono16" and written["/visible/image"][0].encoding == "bgr8"
    assert written["/visible/camera_info"][0].width == SIZE[0]
    ir_stamps = [bag.header_seconds(m) for m in written["/ir/image"]]
    vis_stamps = [bag.header_seconds(m) for m in written["/visible/image"]]
    assert all(0.0 < v - i < 0.02 for i, v in zip(ir_stamps, vis_stamps))  # visible lags ~8 ms (+ jitter)

    out = tmp_path / "eval"
    report = bag.evaluate_bag(src, out, boxes=pairs_dir / "boxes", metrics=["EN", "Qabf"], pipeline=pipeline,
                              progress=False)
    assert report["storage"] == storage
    assert report["sync"]["pairs"] == N_PAIRS
    assert report["sync"]["unmatched"] == {"ir": 0, "visible": 0}
    assert report["frames"] == {"processed": N_PAIRS, "failed": 0, "errors": []}
    assert report["fusion_metrics"]["pairs"] == N_PAIRS
    assert set(report["fusion_metrics"]["model"]) == {"EN", "Qabf"}
    assert report["segmentation"]["box_files_found"] == len(list((pairs_dir / "boxes").iterdir()))
    assert report["latency_ms"]["end_to_end"]["count"] == N_PAIRS

    result = read_topics(out / "bag")
    for topic in bag.output_topics():
        assert len(result[topic]) == N_PAIRS
    for topic in written:
        assert len(result[topic]) == N_PAIRS
    fused = result["/fusion_node/fused"][0]
    assert (fused.width, fused.height, fused.encoding) == (*SIZE, "bgr8")
    assert result["/fusion_node/labels"][0].encoding == "mono8"
    assert fused.header.stamp == written["/visible/image"][0].header.stamp
    assert json.loads((out / "report.json").read_text())["sync"]["pairs"] == N_PAIRS
    md = (out / "report.md").read_text()
    assert "| Qabf |" in md and "person" in md
    for png in ("latency.png", "metrics.png", "contact_sheet.png"):
        assert (out / png).stat().st_size > 1000


def test_video_folders_in_name_order(tmp_path):
    for sub, n in (("ir", 5), ("vis", 4)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            cv2.imwrite(str(tmp_path / sub / f"{sub}_{i:03d}.png"), np.full((24, 32), i * 10, np.uint8))
    streams, names, mode = bag.folder_streams(tmp_path / "ir", tmp_path / "vis", rate=30, vis_rate=25)
    assert mode == "video" and names == [f"vis_{i:03d}" for i in range(4)]
    assert [s.load(2)[0, 0] for s in streams] == [20, 20]
    assert np.allclose(np.diff(streams[0].stamps), 1 / 30) and np.allclose(np.diff(streams[1].stamps), 1 / 25)


def test_sync_statistics_with_known_offsets_and_drops(tmp_path, pipeline):
    src = tmp_path / "in"
    bag.write_camera_bag(src, array_streams(10, 10, offset=0.02, skip_vis=(3, 7)))
    report = bag.evaluate_bag(src, tmp_path / "eval", metrics=[], samples=0, pipeline=pipeline, progress=False)
    sync = report["sync"]
    assert sync["pairs"] == 8
    assert sync["unmatched"] == {"ir": 2, "visible": 0}
    assert sync["offset_ms"]["mean"] == pytest.approx(-20.0, abs=0.01)
    assert sync["offset_ms"]["max_abs"] == pytest.approx(20.0, abs=0.01)
    assert report["topics"]["ir"]["messages"] == 10 and report["topics"]["visible"]["messages"] == 8
    assert report["topics"]["ir"]["rate_hz"] == pytest.approx(10.0)
    assert report["topics"]["ir"]["encodings"] == ["mono16"]


def write_raw_bag(path, messages):
    """A bag of (topic, stamp_ns, Image message) written as given (for malformed messages)."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    ts = bag.typestore()
    writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    conns = {}
    for topic, stamp_ns, msg in messages:
        if topic not in conns:
            conns[topic] = writer.add_connection(topic, bag.IMAGE_TYPE, typestore=ts)
        writer.write(conns[topic], stamp_ns, ts.serialize_cdr(msg, bag.IMAGE_TYPE))
    writer.close()


def test_failing_frames_are_counted_not_dropped(tmp_path, pipeline):
    msgs = []
    for i in range(6):
        t = bag.START_NS + i * 100_000_000
        msgs.append(("/ir/image", t, bag.image_message(np.full((48, 64), 8000 + i, np.uint16), "mono16", t, "ir")))
        vis = bag.image_message(np.full((48, 64, 3), 40, np.uint8), "bgr8", t + 5_000_000, "vis")
        if i == 2:
            vis.data = vis.data[:100]  # truncated pixel data
        msgs.append(("/visible/image", t + 5_000_000, vis))
    write_raw_bag(tmp_path / "in", msgs)
    report = bag.evaluate_bag(tmp_path / "in", tmp_path / "eval", metrics=[], samples=0, pipeline=pipeline,
                              progress=False)
    assert report["topics"]["visible"]["decode_failed"] == 1
    assert report["sync"]["pairs"] == 5
    assert report["sync"]["unmatched"]["ir"] == 1
    assert "truncated" in report["frames"]["errors"][0]["error"]
    assert "decode failed" in (tmp_path / "eval" / "report.md").read_text()


def test_missing_topic_and_unsupported_encoding_are_clear_errors(tmp_path, pipeline):
    t = bag.START_NS
    ir = bag.image_message(np.zeros((8, 8), np.uint8), "mono8", t, "ir")
    write_raw_bag(tmp_path / "only_ir", [("/ir/image", t, ir)])
    with pytest.raises(bag.BagError, match="visible"):
        bag.evaluate_bag(tmp_path / "only_ir", tmp_path / "e1", pipeline=pipeline, progress=False)
    with pytest.raises(bag.BagError, match="no topic /nope"):
        bag.evaluate_bag(tmp_path / "only_ir", tmp_path / "e1", vis_topic="/nope", pipeline=pipeline,
                         progress=False)

    vis = bag.image_message(np.zeros((8, 8, 3), np.uint8), "bgr8", t, "vis")
    vis.encoding = "yuv422"
    write_raw_bag(tmp_path / "yuv", [("/ir/image", t, ir), ("/visible/image", t, vis)])
    with pytest.raises(bag.BagError, match="encoding 'yuv422'"):
        bag.evaluate_bag(tmp_path / "yuv", tmp_path / "e2", pipeline=pipeline, progress=False)


def test_camera_topics_are_found_by_name(tmp_path):
    t = bag.START_NS
    ir = bag.image_message(np.zeros((8, 8), np.uint16), "mono16", t, "ir")
    vis = bag.image_message(np.zeros((8, 8, 3), np.uint8), "rgb8", t, "vis")
    write_raw_bag(tmp_path / "b", [("/flir/thermal/image_raw", t, ir), ("/camera/color/image_raw", t, vis),
                                   ("/fusion_node/fused", t, vis)])
    reader = bag.open_bag(tmp_path / "b")
    try:
        assert bag.pick_topics(reader) == ("/flir/thermal/image_raw", "/camera/color/image_raw")
    finally:
        reader.close()


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_truncated_bag_is_a_clear_error(tmp_path, pipeline, storage):
    src = tmp_path / "in"
    bag.write_camera_bag(src, array_streams(6, 6), storage=storage)
    data = next(p for p in src.iterdir() if p.suffix in (".mcap", ".db3"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(bag.BagError, match="truncated or corrupt|not a readable"):
        bag.evaluate_bag(src, tmp_path / "eval", pipeline=pipeline, progress=False)


def test_not_a_bag(tmp_path, pipeline):
    with pytest.raises(bag.BagError, match="no such bag"):
        bag.evaluate_bag(tmp_path / "missing", tmp_path / "eval", pipeline=pipeline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(bag.BagError, match="not a readable rosbag2"):
        bag.evaluate_bag(tmp_path / "empty", tmp_path / "eval", pipeline=pipeline)


def test_live_replay_through_the_real_node(tmp_path, monkeypatch):
    import importlib.util
    import random

    if importlib.util.find_spec("ivf_ros.node") is None:
        pytest.skip("ivf_ros.node (the ROS node) is not there yet")
    domain = random.randint(120, 220)  # keep this test's DDS traffic apart from other tests on the machine
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    src = tmp_path / "in"
    bag.write_camera_bag(src, array_streams(12, 12, offset=0.01, skip_vis=(5,), size=(96, 72)))
    report = bag.evaluate_live(src, tmp_path / "live", device="cpu", domain_id=domain, startup_timeout=90, rate=0.2,
                               progress=False)
    assert report["sync"]["expected_pairs"] == 11
    assert report["replay"]["messages"]["/visible/image"] == 11
    fused = report["received"]["/fusion_node/fused"]
    assert 9 <= fused <= 11  # the node may skip a pair while busy, never invent one
    assert report["received"]["/fusion_node/labels_color"] == fused
    assert report["received"]["/diagnostics"] >= 1  # its timers run on the replayed /clock (use_sim_time)
    assert report["latency_ms"]["visible_to_fused"]["count"] == fused
    assert report["node"]["diagnostics"]["values"]["pairs made"]
    recorded = read_topics(tmp_path / "live" / "bag")
    assert len(recorded["/fusion_node/fused"]) == fused and len(recorded["/ir/image"]) == 12
    assert recorded["/fusion_node/fused"][0].width == 96
    assert "fusion_node" in (tmp_path / "live" / "report.md").read_text()
