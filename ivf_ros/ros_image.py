"""sensor_msgs/Image fields <-> numpy arrays, free of ROS: the one conversion of the node and the bag tools.

Arrays follow OpenCV conventions: gray images are H x W, colour images H x W x 3 in BGR order (H x W x 4 BGRA).
Every problem with a message is a ``ValueError`` whose message says what is wrong.
"""
from __future__ import annotations

import sys

import cv2
import numpy as np

# encoding -> (dtype, channels, conversion to OpenCV order or None)
ENCODINGS = {
    "mono8": (np.uint8, 1, None),
    "8UC1": (np.uint8, 1, None),
    "mono16": (np.uint16, 1, None),
    "16UC1": (np.uint16, 1, None),
    "32FC1": (np.float32, 1, None),
    "bgr8": (np.uint8, 3, None),
    "rgb8": (np.uint8, 3, cv2.COLOR_RGB2BGR),
    "bgra8": (np.uint8, 4, None),
    "rgba8": (np.uint8, 4, cv2.COLOR_RGBA2BGRA),
}
_NATIVE_BIG_ENDIAN = sys.byteorder == "big"


def check_fields(encoding: str, height: int, width: int, step: int, data_len: int, supported=None) -> None:
    """Raise ``ValueError`` unless the fields describe a complete image in a supported encoding."""
    allowed = tuple(supported) if supported is not None else tuple(ENCODINGS)
    if encoding not in allowed or encoding not in ENCODINGS:
        raise ValueError(f"unsupported encoding '{encoding}' (supported: {', '.join(allowed)})")
    if height <= 0 or width <= 0 or data_len == 0:
        raise ValueError(f"empty image ({width}x{height}, {data_len} bytes)")
    dtype, channels, _ = ENCODINGS[encoding]
    row = width * channels * np.dtype(dtype).itemsize
    if step < row:
        raise ValueError(f"step {step} is shorter than one {encoding} row of {width} pixels ({row} bytes)")
    if data_len != step * height:
        what = "truncated" if data_len < step * height else "too long"
        raise ValueError(f"data {what}: {data_len} bytes, step x height = {step} x {height} = {step * height}")


def to_array(encoding: str, height: int, width: int, step: int, is_bigendian, data, supported=None) -> np.ndarray:
    """Pixels of an image message as an array (a view of ``data`` where no conversion is needed)."""
    buf = data if isinstance(data, (bytes, bytearray, memoryview)) or hasattr(data, "buffer_info") else bytes(data)
    raw = np.frombuffer(buf, np.uint8)
    check_fields(encoding, height, width, step, raw.size, supported)
    dtype, channels, conversion = ENCODINGS[encoding]
    dtype = np.dtype(dtype)
    rows = raw.reshape(height, step)
    row = width * channels * dtype.itemsize
    if step != row:
        rows = np.ascontiguousarray(rows[:, :row])
    if dtype.itemsize > 1 and bool(is_bigendian) != _NATIVE_BIG_ENDIAN:
        dtype = dtype.newbyteorder()
    pixels = rows.view(dtype).reshape((height, width, channels) if channels > 1 else (height, width))
    if not pixels.dtype.isnative:
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    return cv2.cvtColor(pixels, conversion) if conversion is not None else pixels


def from_array(array: np.ndarray, encoding: str) -> dict:
    """Image message fields (``encoding, height, width, step, is_bigendian, data``) for an OpenCV-order array."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported encoding '{encoding}' (supported: {', '.join(ENCODINGS)})")
    dtype, channels, _ = ENCODINGS[encoding]
    shape_channels = 1 if array.ndim == 2 else array.shape[2]
    if array.ndim not in (2, 3) or shape_channels != channels or array.dtype != np.dtype(dtype):
        raise ValueError(
            f"{encoding} needs {channels} channel(s) of {np.dtype(dtype).name}, "
            f"got shape {array.shape} of {array.dtype.name}"
        )
    if encoding == "rgb8":
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    elif encoding == "rgba8":
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    array = np.ascontiguousarray(array)
    height, width = array.shape[:2]
    return {
        "encoding": encoding,
        "height": height,
        "width": width,
        "step": width * channels * array.dtype.itemsize,
        "is_bigendian": int(_NATIVE_BIG_ENDIAN),
        "data": array.tobytes(),
    }


def image_to_array(msg, supported=None) -> np.ndarray:
    """``to_array`` for a sensor_msgs/Image (or any object with the same fields)."""
    return to_array(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data, supported)


def fill_image(msg, array: np.ndarray, encoding: str, header=None):
    """Write ``array`` into the sensor_msgs/Image ``msg`` (and ``header`` when given); returns ``msg``."""
    for name, value in from_array(array, encoding).items():
        setattr(msg, name, value)
    if header is not None:
        msg.header = header
    return msg


def restamped(msg, header):
    """A copy of the ROS message ``msg`` (CameraInfo, ...) with ``header`` instead of its own."""
    out = type(msg)()
    for name in msg.get_fields_and_field_types():
        setattr(out, name, getattr(msg, name))
    out.header = header
    return out
