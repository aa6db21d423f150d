"""sensor_msgs/Image fields <-> numpy without cv_bridge: every encoding, byte order, padding and bad message."""
from types import SimpleNamespace

import numpy as np
import pytest
from sensor_msgs.msg import Image

from ivf_ros import ros_image

RNG = np.random.default_rng(0)
ARRAYS = {
    "mono8": RNG.integers(0, 256, (5, 7), dtype=np.uint8),
    "8UC1": RNG.integers(0, 256, (5, 7), dtype=np.uint8),
    "mono16": RNG.integers(0, 65536, (5, 7), dtype=np.uint16),
    "16UC1": RNG.integers(0, 65536, (5, 7), dtype=np.uint16),
    "32FC1": RNG.normal(size=(5, 7)).astype(np.float32),
    "bgr8": RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8),
    "rgb8": RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8),
    "bgra8": RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8),
    "rgba8": RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8),
}


@pytest.mark.parametrize("encoding", sorted(ARRAYS))
def test_round_trip(encoding):
    fields = ros_image.from_array(ARRAYS[encoding], encoding)
    assert (fields["height"], fields["width"]) == (5, 7)
    assert len(fields["data"]) == fields["step"] * 5
    np.testing.assert_array_equal(ros_image.to_array(**fields), ARRAYS[encoding])


def test_rgb_data_is_stored_red_first_and_read_back_as_bgr():
    bgr = np.zeros((1, 1, 3), np.uint8)
    bgr[0, 0] = (10, 20, 30)
    fields = ros_image.from_array(bgr, "rgb8")
    assert bytes(fields["data"]) == bytes([30, 20, 10])
    assert ros_image.to_array(**fields)[0, 0].tolist() == [10, 20, 30]


def test_big_endian_mono16():
    values = np.array([[1, 258, 65535]], np.uint16)
    out = ros_image.to_array("mono16", 1, 3, 6, 1, values.astype(">u2").tobytes())
    assert out.dtype == np.uint16 and out.dtype.isnative
    np.testing.assert_array_equal(out, values)


def test_padded_rows():
    values = np.arange(12, dtype=np.uint16).reshape(3, 4)
    rows = [values[r].tobytes() + b"\xff" * 6 for r in range(3)]  # 8 data bytes + 6 padding per row
    out = ros_image.to_array("16UC1", 3, 4, 14, 0, b"".join(rows))
    np.testing.assert_array_equal(out, values)


def test_nan_survives_32fc1():
    a = np.array([[np.nan, np.inf, 1.5]], np.float32)
    out = ros_image.to_array(**ros_image.from_array(a, "32FC1"))
    assert np.isnan(out[0, 0]) and np.isinf(out[0, 1]) and out[0, 2] == 1.5


@pytest.mark.parametrize("fields, message", [
    (("yuv422", 2, 2, 4, 0, bytes(8)), "unsupported encoding 'yuv422'"),
    (("mono8", 0, 0, 0, 0, b""), "empty image"),
    (("mono8", 2, 2, 2, 0, b""), "empty image"),
    (("mono16", 2, 4, 8, 0, bytes(10)), "truncated: 10 bytes, step x height = 8 x 2 = 16"),
    (("mono16", 2, 4, 8, 0, bytes(20)), "too long"),
    (("bgr8", 2, 4, 8, 0, bytes(16)), "step 8 is shorter than one bgr8 row of 4 pixels \\(12 bytes\\)"),
])
def test_bad_fields_say_what_is_wrong(fields, message):
    with pytest.raises(ValueError, match=message):
        ros_image.to_array(*fields)


def test_supported_subset_is_enforced():
    fields = ros_image.from_array(ARRAYS["bgra8"], "bgra8")
    with pytest.raises(ValueError, match="unsupported encoding 'bgra8' \\(supported: mono8, mono16\\)"):
        ros_image.to_array(**fields, supported=("mono8", "mono16"))


def test_from_array_checks_shape_and_type():
    with pytest.raises(ValueError, match="mono16 needs 1 channel"):
        ros_image.from_array(np.zeros((2, 2), np.uint8), "mono16")
    with pytest.raises(ValueError, match="unsupported encoding"):
        ros_image.from_array(np.zeros((2, 2), np.uint8), "jpeg")


def test_message_adapter_with_a_real_image_and_a_look_alike():
    msg = ros_image.fill_image(Image(), ARRAYS["mono16"], "mono16")
    msg.header.frame_id = "ir"
    np.testing.assert_array_equal(ros_image.image_to_array(msg), ARRAYS["mono16"])
    look_alike = SimpleNamespace(encoding="mono8", height=1, width=3, step=3, is_bigendian=0, data=[1, 2, 3])
    assert ros_image.image_to_array(look_alike).tolist() == [[1, 2, 3]]
