"""The node and ``ivf bag eval`` accept and reject the same inputs: one list of bad images, each sent to a real
fusion_node over DDS and written into a bag for the offline evaluation; both must refuse it with the same reason and
go on with the next pair. Also ``ivf bag make --compressed`` -> ``ivf bag eval``, and the live tool's count of
messages the node's arrival check rejects."""
import numpy as np
import pytest
from rclpy.parameter import Parameter
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CompressedImage, Image

from ivf_ros import bag
from ivf_ros.bag.live import _expected_pairs
from ivf_ros.node import FusionNode
from node_harness import DEFAULTS, Harness, Ros, bgr, compressed, image, ir16, stamp_ns, value, warm_up

MAX_PIXELS = 20_000  # the good frames are 160x120 = 19,200 pixels


def _nan_ir(stamp):
    return image(np.full((120, 160), np.nan, np.float32), "32FC1", stamp)


def _negative(msg):
    msg.header.stamp.sec = -3
    return msg


# case -> (stream, transport, bad message for a stamp, reason both must give)
CASES = {
    "unsupported encoding": ("ir", "raw", lambda t: image(ir16(120, 160), "mono16", t, encoding="yuv422"),
                             "unsupported encoding 'yuv422'"),
    "empty": ("ir", "raw", lambda t: image(ir16(120, 160), "mono16", t, height=0, width=0, step=0, data=b""),
              "empty image"),
    "truncated": ("ir", "raw", lambda t: image(ir16(120, 160), "mono16", t, data=bytes(1000)),
                  "data truncated: 1000 bytes"),
    "short step": ("ir", "raw", lambda t: image(ir16(120, 160), "mono16", t, step=100),
                   "step 100 is shorter than one mono16 row"),
    "too long": ("ir", "raw", lambda t: image(ir16(120, 160), "mono16", t, data=bytes(320 * 121)), "data too long"),
    "16-bit visible": ("vis", "raw", lambda t: image(ir16(120, 160), "mono16", t), "unsupported encoding 'mono16'"),
    "all NaN IR": ("ir", "raw", _nan_ir, "IR image has no finite values"),
    "negative IR stamp": ("ir", "raw", lambda t: _negative(image(ir16(120, 160), "mono16", t)),
                          "header stamp is negative"),
    "negative visible stamp": ("vis", "raw", lambda t: _negative(image(bgr(120, 160), "bgr8", t)),
                               "header stamp is negative"),
    "oversized": ("vis", "raw", lambda t: image(bgr(120, 200), "bgr8", t), "more than max_pixels 20000"),
    "undecodable JPEG": ("vis", "compressed", lambda t: compressed(bgr(120, 160), t, data=b"\xff\xd8not a jpeg"),
                         "undecodable jpeg payload"),
    "unsupported format": ("vis", "compressed", lambda t: compressed(bgr(120, 160), t, fmt="bgr8; tiff compressed"),
                           "unsupported compressed format"),
    "16-bit PNG visible": ("vis", "compressed", lambda t: compressed(ir16(120, 160), t),
                           "unsupported encoding 'mono16'"),
    "oversized PNG": ("ir", "compressed", lambda t: compressed(ir16(120, 200), t), "more than max_pixels 20000"),
}


def _good(stream, transport, t):
    if transport == "compressed":
        return compressed(ir16(120, 160) if stream == "ir" else bgr(120, 160), t)
    return image(ir16(120, 160), "mono16", t) if stream == "ir" else image(bgr(120, 160), "bgr8", t)


@pytest.fixture(scope="module")
def ros():
    return Ros.shared()


@pytest.fixture(scope="module")
def nodes(ros):
    """One node per transport, both with max_pixels 20000; no test changes their parameters."""
    started = {}
    for transport in ("raw", "compressed"):
        namespace = ros.namespace()
        values = dict(DEFAULTS, transport=transport, max_pixels=MAX_PIXELS)
        node = FusionNode(context=ros.context, namespace=namespace,
                          parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
        h = Harness(ros.context, namespace, image_type=CompressedImage if transport == "compressed" else Image)
        ros.add(node, h.node)
        assert node.start(), node.failure
        assert h.wait(lambda: h.ir.get_subscription_count() and h.vis.get_subscription_count())
        started[transport] = (node, h, lambda stamp=None, h=h, tr=transport: _publish_good(h, tr, stamp))
        warm_up(h, publish=started[transport][2])
    yield started
    for node, h, _ in started.values():
        ros.remove(node, h.node)


def _publish_good(h, transport, stamp=None):
    stamp = h.now_ns() if stamp is None else stamp
    h.ir.publish(_good("ir", transport, stamp))
    h.vis.publish(_good("vis", transport, stamp))
    return stamp


@pytest.fixture(scope="module")
def pipeline():
    from ivf_ros.pipeline import FusionPipeline

    return FusionPipeline(device="cpu")


def _bag_with(path, stream, transport, bad):
    """good pair, the bad message with a good partner, good pair; raw CDR as a recorder writes it."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    kind = bag.COMPRESSED_TYPE if transport == "compressed" else bag.IMAGE_TYPE
    suffix = "/compressed" if transport == "compressed" else ""
    writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    conns = {s: writer.add_connection(f"/{t}/image{suffix}", kind, typestore=bag.typestore())
             for s, t in (("ir", "ir"), ("vis", "visible"))}
    for i in range(3):
        t = bag.START_NS + i * 100_000_000
        for s in ("ir", "vis"):
            msg = bad(t) if (i == 1 and s == stream) else _good(s, transport, t)
            writer.write(conns[s], t + 1_000_000, serialize_message(msg))
    writer.close()


@pytest.mark.parametrize("case", list(CASES))
def test_node_and_bag_eval_reject_the_same_inputs(nodes, pipeline, tmp_path, case):
    stream, transport, bad, reason = CASES[case]
    node, h, publish_good = nodes[transport]
    key = "bad IR images" if stream == "ir" else "bad visible images"
    before, logs, start = value(node.diagnostics(), key), h.count("rosout"), h.count("fused")
    stamp = h.now_ns()
    (h.ir if stream == "ir" else h.vis).publish(bad(stamp))
    (h.vis if stream == "ir" else h.ir).publish(_good("vis" if stream == "ir" else "ir", transport, stamp))
    assert h.wait(lambda: value(node.diagnostics(), key) == before + 1)
    assert h.wait(lambda: h.logs(logs, reason)), f"node: no warning with '{reason}'"
    # 0.5 s on: the bad image's partner may still wait (when the arrival check refused the bad one); not with this
    assert h.fused_stamp(publish_good(stamp + 500_000_000), start), "the node stopped fusing"
    assert not any(stamp_ns(m) == stamp for m in h.since("fused", start))

    _bag_with(tmp_path / "in", stream, transport, bad)
    report = bag.evaluate_bag(tmp_path / "in", tmp_path / "eval", metrics=[], samples=0, pipeline=pipeline,
                              progress=False, max_pixels=MAX_PIXELS)
    topic = "ir" if stream == "ir" else "visible"
    assert report["topics"][topic]["decode_failed"] == 1 and report["frames"]["processed"] == 2
    assert reason in report["frames"]["errors"][0]["error"], report["frames"]["errors"]


def test_bag_make_compressed_then_eval(tmp_path, pipeline):
    import cv2

    from ivf_ros.cli import main

    for sub in ("ir", "vi"):
        (tmp_path / sub).mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "ir" / f"{i:03d}.png"), ir16(96, 128))
        cv2.imwrite(str(tmp_path / "vi" / f"{i:03d}.png"), bgr(96, 128))
    src = tmp_path / "bag"
    assert main(["bag", "make", "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"), "--out", str(src),
                 "--compressed"]) == 0
    reader = bag.open_bag(src)
    try:
        assert {t: i.msgtype for t, i in reader.topics.items() if "image" in t} == {
            "/ir/image/compressed": bag.COMPRESSED_TYPE, "/visible/image/compressed": bag.COMPRESSED_TYPE}
        formats = {}
        ts = bag.typestore()
        for conn, _, raw in reader.messages():
            if conn.msgtype == bag.COMPRESSED_TYPE:
                formats[conn.topic] = ts.deserialize_cdr(raw, conn.msgtype).format
    finally:
        reader.close()
    assert formats == {"/ir/image/compressed": "mono16; png compressed mono16",
                       "/visible/image/compressed": "bgr8; jpeg compressed bgr8"}
    report = bag.evaluate_bag(src, tmp_path / "eval", metrics=["EN"], samples=0, pipeline=pipeline, progress=False)
    assert report["sync"]["pairs"] == 3 and report["frames"]["processed"] == 3
    assert report["topics"]["ir"]["topic"] == "/ir/image/compressed"
    out = bag.open_bag(tmp_path / "eval" / "bag")
    try:
        assert out.topics["/fusion_node/fused"].msgcount == 3
    finally:
        out.close()


def test_live_eval_counts_what_the_node_would_reject(tmp_path):
    _bag_with(tmp_path / "in", "vis", "raw", CASES["negative visible stamp"][2])
    reader = bag.open_bag(tmp_path / "in")
    try:
        from ivf_ros.sync import ApproximateTimeSynchronizer

        pairs, rejected = _expected_pairs(reader, "/ir/image", "/visible/image", ApproximateTimeSynchronizer())
    finally:
        reader.close()
    assert pairs == 2 and rejected == {"/ir/image": 0, "/visible/image": 1}


def test_live_eval_of_a_compressed_bag_through_the_real_node(tmp_path):
    from node_harness import DOMAIN

    stamps = [i / 10 for i in range(8)]
    streams = [bag.CameraStream(bag.IR_TOPIC, "ir", stamps, [ir16(72, 96) for _ in stamps], is_ir=True),
               bag.CameraStream(bag.VIS_TOPIC, "vis", [t + 0.01 for t in stamps], [bgr(72, 96) for _ in stamps])]
    bag.write_camera_bag(tmp_path / "in", streams, compressed=True)
    report = bag.evaluate_live(tmp_path / "in", tmp_path / "live", device="cpu", domain_id=DOMAIN,
                               startup_timeout=90, rate=0.3, progress=False)
    assert "-p transport:=compressed" in report["node"]["command"]
    assert report["sync"]["expected_pairs"] == 8
    assert 6 <= report["received"]["/fusion_node/fused"] <= 8  # the node may skip a pair while busy, never invent one
