"""MFNet (Ha et al., IROS 2017), the RGB-thermal segmentation teacher, written from
``../shared/teachers/mfnet/README.md``. Training time only: the node never imports it and it is never shipped.

    teacher = load_mfnet()                       # ../shared/teachers/mfnet/mfnet_rgbt_9class.safetensors
    logits = teacher(rgbt)                       # N x 4 x H x W in [0, 1] (R, G, B, IR) -> N x 9 x H x W
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from ivf_ros.data import data_root

MFNET_CLASSES = ["unlabelled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump"]


def teacher_dir() -> Path:
    """``../shared/teachers/mfnet`` next to the data root."""
    return data_root().parent / "teachers" / "mfnet"


class Basic(nn.Module):
    """conv 3x3 (bias) -> BatchNorm -> LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.bn(self.conv(x)), 0.2)


class MiniInception(nn.Module):
    """Three stages, each a plain and a dilated 3x3 unit side by side, concatenated (plain first)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        half = cout // 2
        for k, c in enumerate((cin, cout, cout), start=1):
            setattr(self, f"conv{k}_left", Basic(c, half))
            setattr(self, f"conv{k}_right", Basic(c, half, dilation=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in (1, 2, 3):
            x = torch.cat([getattr(self, f"conv{k}_left")(x), getattr(self, f"conv{k}_right")(x)], dim=1)
        return x


class MFNet(nn.Module):
    """Two encoders (RGB, IR), a shared decoder with additive skips; logits at full resolution."""

    def __init__(self, num_classes: int = 9, rgb=(16, 48, 48, 96, 96), ir=(16, 16, 16, 36, 36)):
        super().__init__()
        for tag, cin, w in (("rgb", 3, rgb), ("inf", 1, ir)):
            setattr(self, f"conv1_{tag}", Basic(cin, w[0]))
            setattr(self, f"conv2_1_{tag}", Basic(w[0], w[1]))
            setattr(self, f"conv2_2_{tag}", Basic(w[1], w[1]))
            setattr(self, f"conv3_1_{tag}", Basic(w[1], w[2]))
            setattr(self, f"conv3_2_{tag}", Basic(w[2], w[2]))
            setattr(self, f"conv4_{tag}", MiniInception(w[2], w[3]))
            setattr(self, f"conv5_{tag}", MiniInception(w[3], w[4]))
        self.decode4 = Basic(rgb[3] + ir[3], 64)
        self.decode3 = Basic(64, 64)
        self.decode2 = Basic(64, 32)
        self.decode1 = Basic(32, num_classes)

    def _encode(self, x: torch.Tensor, tag: str):
        unit = lambda name: getattr(self, f"{name}_{tag}")  # noqa: E731
        x = F.max_pool2d(unit("conv1")(x), 2)
        skip2 = unit("conv2_2")(unit("conv2_1")(x))
        skip3 = unit("conv3_2")(unit("conv3_1")(F.max_pool2d(skip2, 2)))
        skip4 = unit("conv4")(F.max_pool2d(skip3, 2))
        return unit("conv5")(F.max_pool2d(skip4, 2)), (skip4, skip3, skip2)

    def forward(self, rgbt: torch.Tensor) -> torch.Tensor:
        """``rgbt``: N x 4 x H x W in [0, 1], H and W multiples of 16. Returns N x 9 x H x W logits."""
        x_rgb, skips_rgb = self._encode(rgbt[:, :3], "rgb")
        x_ir, skips_ir = self._encode(rgbt[:, 3:], "inf")
        x = torch.cat([x_rgb, x_ir], dim=1)
        for unit, s_rgb, s_ir in zip((self.decode4, self.decode3, self.decode2), skips_rgb, skips_ir):
            x = unit(F.interpolate(x, scale_factor=2, mode="nearest") + torch.cat([s_rgb, s_ir], dim=1))
        return self.decode1(F.interpolate(x, scale_factor=2, mode="nearest"))


def load_mfnet(path: str | Path | None = None) -> MFNet:
    """MFNet with the shared weights, in eval mode; the file's class list must be ``MFNET_CLASSES``."""
    path = Path(path) if path else teacher_dir() / "mfnet_rgbt_9class.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no MFNet weights (expected ../shared/teachers/mfnet)")
    with safe_open(str(path), framework="pt") as f:
        classes = json.loads((f.metadata() or {}).get("classes", "null"))
    if classes != MFNET_CLASSES:
        raise ValueError(f"{path}: classes {classes} are not MFNet's {MFNET_CLASSES}")
    model = MFNet(len(MFNET_CLASSES))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def rgbt_tensor(ir: np.ndarray, vis_bgr: np.ndarray) -> torch.Tensor:
    """1 x 4 x H x W teacher input from an IR gray and a visible BGR uint8 image (R, G, B, IR over 255)."""
    vis = vis_bgr if vis_bgr.ndim == 3 else np.dstack([vis_bgr] * 3)
    x = np.concatenate([vis[..., ::-1], ir[..., None]], axis=2).astype(np.float32) / 255.0
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@torch.no_grad()
def teacher_logits(model: MFNet, ir: np.ndarray, vis_bgr: np.ndarray) -> torch.Tensor:
    """9 x H x W logits of one pair of any size (padded by replication to multiples of 16, then cropped)."""
    x = rgbt_tensor(ir, vis_bgr)
    h, w = x.shape[-2:]
    ph, pw = -h % 16, -w % 16
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return model(x)[0, :, :h, :w]
