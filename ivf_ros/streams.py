"""What fusion_node and ``ivf bag eval`` accept from a camera: one table of encodings, one check per input stream.

The check works on sensor_msgs/Image and sensor_msgs/CompressedImage objects alike (rclpy or rosbags messages: same
field names), free of ROS. Every rejection is a ``ValueError`` whose message says what is wrong; the node and the bag
evaluation both count it as a bad image of that stream, so they accept and reject the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from . import ros_image

IR, VIS = 0, 1
STREAM_NAMES = ("IR", "visible")
# The supported encodings of each stream (raw Image messages; a decoded compressed payload maps to one of them).
SUPPORTED = {
    IR: ("mono8", "8UC1", "mono16", "16UC1", "32FC1", "rgb8", "bgr8"),
    VIS: ("mono8", "8UC1", "rgb8", "bgr8", "bgra8", "rgba8"),
}
COMPRESSIONS = ("jpeg", "png")  # CompressedImage payloads (decoded with OpenCV; PNG may be 16-bit)
MAX_PIXELS = 4_194_304  # default largest frame (4 MP, e.g. 2048x2048 or 2560x1600)


def stamp_seconds(stamp) -> float:
    """Seconds of a builtin_interfaces/Time; ``ValueError`` for a negative or malformed one (the one stamp guard)."""
    sec, nanosec = int(stamp.sec), int(stamp.nanosec)
    if sec < 0:
        raise ValueError(f"header stamp is negative ({sec} s)")
    if not 0 <= nanosec < 1_000_000_000:
        raise ValueError(f"header stamp nanosec {nanosec} is outside [0, 1e9)")
    return sec + nanosec * 1e-9


def compression_of(fmt: str) -> str:
    """``png`` or ``jpeg`` from a CompressedImage format (``jpeg``, ``png``, ``mono16; png compressed mono16``...)."""
    words = fmt.lower().replace(";", " ").split()
    if "png" in words:
        return "png"
    if "jpeg" in words or "jpg" in words:
        return "jpeg"
    raise ValueError(f"unsupported compressed format '{fmt}' (supported: {', '.join(COMPRESSIONS)})")


def decode_compressed(fmt: str, data) -> np.ndarray:
    """Decode a JPEG or PNG payload (OpenCV order; 16-bit PNG stays uint16)."""
    kind = compression_of(fmt)
    try:
        buf = np.frombuffer(data, np.uint8)
    except TypeError:  # a plain list of byte values
        buf = np.asarray(data, np.uint8)
    if buf.size == 0:
        raise ValueError(f"empty {kind} payload")
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"undecodable {kind} payload ({buf.size} bytes)")
    return image


_OPENCV_ENCODINGS = {("uint8", 1): "mono8", ("uint16", 1): "mono16", ("uint8", 3): "bgr8", ("uint8", 4): "bgra8"}


def encoding_of(image: np.ndarray) -> str:
    """The Image encoding an OpenCV array corresponds to (mono8, mono16, bgr8, bgra8)."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    if (image.dtype.name, channels) not in _OPENCV_ENCODINGS:
        raise ValueError(f"decoded image is {image.dtype.name} with {channels} channels, which has no encoding here")
    return _OPENCV_ENCODINGS[(image.dtype.name, channels)]


def is_compressed(msg) -> bool:
    return hasattr(msg, "format")


@dataclass
class Checked:
    """An accepted image: pixels in OpenCV order, notes on what was odd but usable, whether its size changed."""

    image: np.ndarray
    notes: list[str] = field(default_factory=list)
    resized: bool = False


class StreamCheck:
    """The checks of one input stream: ``fields`` on arrival (cheap), ``convert`` before processing."""

    def __init__(self, stream: int, max_pixels: int = MAX_PIXELS):
        self.stream, self.name = stream, STREAM_NAMES[stream]
        self.supported = SUPPORTED[stream]
        self.max_pixels = int(max_pixels)
        self.size: tuple[int, int] | None = None  # (width, height) of the last converted image

    def fields(self, msg) -> float:
        """Stamp, encoding or format, size, step, data length and the pixel limit; returns the stamp (s)."""
        stamp = stamp_seconds(msg.header.stamp)
        if is_compressed(msg):
            kind = compression_of(msg.format)
            if len(msg.data) == 0:
                raise ValueError(f"empty {kind} payload")
        else:
            ros_image.check_fields(msg.encoding, msg.height, msg.width, msg.step, len(msg.data), self.supported)
            self._check_pixels(msg.width, msg.height)
        return stamp

    def convert(self, msg) -> Checked:
        """The image's pixels; ``ValueError`` when it cannot be used (also after a successful ``fields``)."""
        if is_compressed(msg):
            image = decode_compressed(msg.format, msg.data)
            encoding = encoding_of(image)
            if encoding not in self.supported:
                raise ValueError(f"unsupported encoding '{encoding}' (decoded {compression_of(msg.format)}; "
                                 f"supported: {', '.join(self.supported)})")
            self._check_pixels(image.shape[1], image.shape[0])
        else:
            image = ros_image.image_to_array(msg, self.supported)
        checked = Checked(image)
        if image.dtype.kind == "f":
            bad = int(image.size - np.count_nonzero(np.isfinite(image)))
            if bad == image.size:
                raise ValueError(f"{self.name} image has no finite values")
            if bad:
                checked.notes.append(f"{self.name} 32FC1 image has {bad} NaN/inf pixels "
                                     "(NaN and -inf shown cold, +inf hot)")
        size = (image.shape[1], image.shape[0])
        if self.size is not None and size != self.size:
            checked.notes.append(f"{self.name} image size changed mid-stream: {_wh(self.size)} -> {_wh(size)}")
            checked.resized = True
        self.size = size
        return checked

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise ValueError(f"{width}x{height} image has {width * height} pixels, more than max_pixels "
                             f"{self.max_pixels}")


def _wh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
