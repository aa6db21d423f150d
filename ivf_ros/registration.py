"""Map the IR image into the visible camera's frame: one function used by every path (CLI, bags, node).

A registration is a 3x3 homography from IR pixel coordinates to visible pixel coordinates, recorded together with
the image sizes it was estimated for. Applied to frames of other sizes it is rescaled accordingly, so a mapping
calibrated at full resolution also serves binned or resized streams. With no homography, IR is resized to the
visible size (the cameras are assumed to share a field of view).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml

from .data import file_problem
from .errors import one_line


MAX_FILE_BYTES = 1 << 16  # a homography file is a few hundred bytes
MAX_SIDE = 1 << 16  # largest image side a recorded size may name


def _as_number(v) -> float | None:
    """A YAML value as a float, or None when it is not a number (bools, lists, words). Strings that spell a number
    count: YAML 1.1 reads ``1e-6`` (no dot) as a string."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        return float(v)
    except (ValueError, OverflowError):
        return None


class RegistrationError(ValueError):
    """A homography file or value is unusable."""


@dataclass
class Registration:
    matrix: np.ndarray = field(default_factory=lambda: np.eye(3))
    ir_size: tuple[int, int] | None = None  # (width, height) the matrix was estimated for
    vis_size: tuple[int, int] | None = None
    method: str = "identity"
    residual_px: float | None = None
    confidence: float | None = None  # 0..1, from automatic calibration (None when unknown)

    def __post_init__(self):
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape != (3, 3):
            raise RegistrationError(f"homography must be a finite 3x3 matrix, got shape {m.shape}")
        if not np.all(np.isfinite(m)):
            raise RegistrationError("homography must be a finite 3x3 matrix, it holds NaN or infinite values")
        if np.linalg.cond(m) > 1e12:  # scale-free, unlike the determinant
            raise RegistrationError("homography is singular")
        self.matrix = m / m[2, 2] if abs(m[2, 2]) > 1e-12 else m

    @property
    def is_identity(self) -> bool:
        return bool(np.allclose(self.matrix, np.eye(3)))

    def matrix_for(self, ir_shape: tuple[int, int], vis_shape: tuple[int, int]) -> np.ndarray:
        """The homography for IR frames of ``ir_shape`` (h, w) into visible frames of ``vis_shape`` (h, w)."""
        ir_wh = self.ir_size or (ir_shape[1], ir_shape[0])
        vis_wh = self.vis_size or (vis_shape[1], vis_shape[0])
        s_ir = np.diag([ir_wh[0] / ir_shape[1], ir_wh[1] / ir_shape[0], 1.0])  # actual IR px -> calibrated IR px
        s_vis = np.diag([vis_shape[1] / vis_wh[0], vis_shape[0] / vis_wh[1], 1.0])
        return s_vis @ self.matrix @ s_ir

    def apply(self, ir: np.ndarray, vis_shape: tuple[int, int]) -> np.ndarray:
        """Warp (or resize) ``ir`` into the visible frame of size ``vis_shape`` (h, w)."""
        h, w = vis_shape[:2]
        if self.is_identity and self.ir_size is None and self.vis_size is None:
            if ir.shape[:2] == (h, w):
                return ir
            return cv2.resize(ir, (w, h), interpolation=cv2.INTER_LINEAR)
        m = self.matrix_for(ir.shape[:2], (h, w))
        return cv2.warpPerspective(ir, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    def to_dict(self) -> dict:
        out = {"homography": self.matrix.tolist(), "method": self.method}
        if self.ir_size:
            out["ir_size"] = list(self.ir_size)
        if self.vis_size:
            out["vis_size"] = list(self.vis_size)
        if self.residual_px is not None:
            out["residual_px"] = float(self.residual_px)
        if self.confidence is not None:
            out["confidence"] = float(self.confidence)
        return out

    def transform_points(self, pts, ir_shape: tuple[int, int], vis_shape: tuple[int, int]) -> np.ndarray:
        """Map (N, 2) IR pixel coordinates (x, y) of frames ``ir_shape`` into frames ``vis_shape`` (h, w)."""
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        q = np.hstack([p, np.ones((len(p), 1))]) @ self.matrix_for(ir_shape, vis_shape).T
        return q[:, :2] / q[:, 2:3]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text("# IR -> visible registration (ivf_ros). homography maps IR pixels to visible pixels.\n"
                        + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "homography") -> "Registration":
        if not isinstance(d, dict):
            raise RegistrationError(f"{source}: not a YAML mapping with a 'homography' key")
        if "homography" not in d:
            raise RegistrationError(f"{source}: no 'homography' key")
        rows = d["homography"]
        values = [_as_number(v) for r in rows for v in r] if isinstance(rows, list) and all(
            isinstance(r, list) and len(r) == 3 for r in rows) else []
        if len(values) != 9 or None in values:
            raise RegistrationError(f"{source}: 'homography' is not a 3x3 list of numbers")
        m = np.asarray(values, dtype=np.float64).reshape(3, 3)

        def size(key):
            v = d.get(key)
            if v is None:
                return None
            wh = [_as_number(x) for x in v] if isinstance(v, list) and len(v) == 2 else [None]
            if not all(x is not None and 0 < x <= MAX_SIDE and x.is_integer() for x in wh):
                raise RegistrationError(f"'{key}' must be [width, height], whole numbers in 1..{MAX_SIDE}, "
                                        f"not {v!r}"[:200])
            return int(wh[0]), int(wh[1])

        def number(key, low, high):
            v = d.get(key)
            if v is None:
                return None
            x = _as_number(v)
            if x is None or not low <= x <= high:
                raise RegistrationError(f"'{key}' must be a number in [{low}, {high}], not {v!r}"[:200])
            return x

        try:
            return cls(m, size("ir_size"), size("vis_size"), str(d.get("method", "file")),
                       number("residual_px", 0.0, 1e6), number("confidence", 0.0, 1.0))
        except RegistrationError as exc:
            raise RegistrationError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Registration":
        """Read a homography YAML; every problem is a ``RegistrationError`` naming the file and what is wrong."""
        path = Path(path)
        problem = file_problem(path, "homography")
        if problem:
            raise RegistrationError(problem)
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RegistrationError(f"{path}: {size} bytes is too large for a homography file "
                                    f"(at most {MAX_FILE_BYTES})")
        try:
            data = yaml.safe_load(path.read_text())
        except UnicodeDecodeError:
            raise RegistrationError(f"{path}: not a text file") from None
        except yaml.YAMLError as exc:
            raise RegistrationError(f"{path}: not valid YAML ({one_line(exc, 120)})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_flat(cls, values) -> "Registration":
        """From 9 row-major numbers (the node's ``homography`` parameter)."""
        values = list(values)
        if len(values) != 9:
            raise RegistrationError(f"homography needs 9 numbers (row-major 3x3), got {len(values)}")
        return cls(np.asarray(values, dtype=np.float64).reshape(3, 3), method="parameter")
