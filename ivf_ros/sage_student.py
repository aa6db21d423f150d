"""The published SAGE student architecture, rebuilt from its description for speed comparisons only.

SAGE (Wu et al., CVPR 2025, "Every SAM Drop Counts") distils a SAM-guided teacher into a student of 15
convolutions with 32 channels: conv-BN-LeakyReLU blocks at full, 1/2 and 1/4 resolution and a U-Net decoder,
about 140k parameters. Weights are random: run time does not depend on them. Never used for fusion.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import FusionStudent

WIDTH = 32


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


class SageStudent(nn.Module):
    """IR + visible luminance (N x 1 x H x W each) -> fused luminance N x 1 x H x W."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_block(2, w), _block(w, w))  # full resolution
        self.enc2 = nn.Sequential(_block(w, w, stride=2), _block(w, w), _block(w, w))  # 1/2
        self.enc4 = nn.Sequential(_block(w, w, stride=2), _block(w, w), _block(w, w))  # 1/4
        self.dec2 = nn.Sequential(_block(2 * w, w), _block(w, w), _block(w, w))  # 1/2, skip from enc2
        self.dec1 = nn.Sequential(_block(2 * w, w), _block(w, w), _block(w, w))  # full, skip from enc1
        self.out = nn.Conv2d(w, 1, 3, padding=1)

    def forward(self, ir: torch.Tensor, vis_y: torch.Tensor) -> torch.Tensor:
        f1 = self.enc1(torch.cat([ir, vis_y], dim=1))
        f2 = self.enc2(f1)
        f4 = self.enc4(f2)
        up = F.interpolate(f4, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        d2 = self.dec2(torch.cat([up, f2], dim=1))
        up = F.interpolate(d2, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up, f1], dim=1))
        return torch.sigmoid(self.out(d1))

    fold_batchnorm = FusionStudent.fold_batchnorm  # same conv-BN-activation blocks, same folding
