"""The student network the node runs: IR + visible luminance in, fused luminance and class logits out.

The network looks at the pair at a quarter of its resolution and predicts, per low-resolution pixel, how to mix
the two sources: a pixel-wise maximum (the strongest trivial fusion) corrected by a base/detail decomposition, as
in decomposition-based fusion. The mixing coefficients are upsampled bilinearly and applied to the
full-resolution images, so the output keeps every source pixel's detail, has exactly the input size, and costs
only a few element-wise operations at full resolution.

    fused = m * max(ir, vis) + a_ir * base(ir) + a_vis * base(vis) + c + k_ir * detail(ir) + k_vis * detail(vis)

where base() is a smooth low-pass image and detail() = image - base().

Segmentation: with ``seg_width`` 0 (checkpoints before the distilled head) a 1x1 head on the shared 1/4 decoder
features. With ``seg_width`` > 0 the head has its own decoder path: ``seg_depth`` 3x3 blocks of ``seg_width``
channels at 1/4 on the upsampled 1/8 decoder output and the 1/4 encoder features (not the features the fusion
coefficients read), then a 1x1 classifier; logits at 1/4, upsampled bilinearly. With ``seg_context`` > 0 the
head first runs two 3x3 blocks of ``seg_context`` channels at 1/8 on the 1/8 decoder input (its own context path)
and its 1/4 blocks read those, upsampled, with the 1/4 encoder features. With ``seg_rows`` 1 the 1/8 path also
reads the row coordinate (0 at the top of the image, 1 at the bottom): where in the frame a pixel lies (sky above,
road below), which convolutions alone cannot see. (A refinement at 1/2 with the stem
features was measured at +20 ms per 640x480 pair on 2 threads, over the time budget.)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

ARCHITECTURE = "ivf_coeffnet"

# Offsets (m, a_ir, a_vis, c, k_ir, k_vis) that make a freshly initialised network a pixel-wise max fusion.
_COEFF_OFFSET = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def row_coordinates(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W map of each row's position, (row + 0.5) / H: 0 at the top, 1 at the bottom (traceable)."""
    ones = torch.ones_like(x[:, :1])
    return (ones.cumsum(2) - 0.5) / ones.sum(2, keepdim=True)


def base_layer(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """A smooth low-pass version of ``x`` (area downsample, bilinear upsample), same size as ``x``."""
    h, w = x.shape[-2:]
    small = F.adaptive_avg_pool2d(x, (max(1, h // factor), max(1, w // factor)))
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


class FusionStudent(nn.Module):
    """Fast fusion + segmentation network; see the module docstring for the fusion rule."""

    architecture = ARCHITECTURE
    # Hyper-parameter -> (type, smallest, largest) a checkpoint may ask for; checked before the model is built.
    # 255 classes at most: class ids travel as uint8 (255 is the training IGNORE label).
    hyper_parameter_limits = {"num_classes": (int, 1, 255), "width": (int, 1, 256), "seg_width": (int, 0, 256),
                              "seg_depth": (int, 1, 8), "seg_context": (int, 0, 256),
                              "seg_rows": (int, 0, 1)}

    def __init__(self, num_classes: int = 4, width: int = 16, seg_width: int = 0, seg_depth: int = 1,
                 seg_context: int = 0, seg_rows: int = 0):
        super().__init__()
        w = width
        if seg_width and seg_depth < 1:
            raise ValueError(f"seg_depth must be at least 1, not {seg_depth}")
        self.num_classes = num_classes
        self.width = width
        if seg_rows and not (seg_width and seg_context):
            raise ValueError("seg_rows needs the 1/8 context path (seg_width and seg_context > 0)")
        self.seg_width, self.seg_depth, self.seg_context, self.seg_rows = seg_width, seg_depth, seg_context, seg_rows
        self.stem = _block(2, w, stride=2)  # 1/2
        self.enc4 = nn.Sequential(_block(w, 2 * w, stride=2), _block(2 * w, 2 * w))  # 1/4
        self.enc8 = nn.Sequential(_block(2 * w, 4 * w, stride=2), _block(4 * w, 4 * w))  # 1/8
        self.enc16 = nn.Sequential(_block(4 * w, 4 * w, stride=2), _block(4 * w, 4 * w))  # 1/16, context
        self.reduce16 = nn.Conv2d(4 * w, 2 * w, 1)  # 1x1 before upsampling keeps the decoder cheap
        self.dec8 = _block(6 * w, 2 * w)
        self.dec4 = _block(4 * w, 2 * w)
        self.coeff_head = nn.Conv2d(2 * w, len(_COEFF_OFFSET), 3, padding=1)
        if seg_width and seg_context:  # own 1/8 path on dec8's input
            self.seg8 = nn.Sequential(_block(6 * w, seg_context), _block(seg_context, seg_context))
            if seg_rows:  # the rows' term, added after the first block's BatchNorm (folding leaves it alone)
                self.seg_rows_conv = nn.Conv2d(1, seg_context, 3, padding=1, bias=False)
        if seg_width:  # own path: up(d8 or seg8) + f4, not dec4's output
            self.seg4 = nn.ModuleList([_block((seg_context or 2 * w) + 2 * w, seg_width)] +
                                      [_block(seg_width, seg_width) for _ in range(seg_depth - 1)])
            self.seg_head = nn.Conv2d(seg_width, num_classes, 1)
        else:
            self.seg_head = nn.Conv2d(2 * w, num_classes, 1)
        nn.init.zeros_(self.coeff_head.weight)
        nn.init.zeros_(self.coeff_head.bias)
        self.register_buffer("coeff_offset", torch.tensor(_COEFF_OFFSET).view(1, -1, 1, 1), persistent=False)

    def fold_batchnorm(self) -> "FusionStudent":
        """Fold every BatchNorm into its convolution (inference only; weights change names)."""
        for block in self.modules():
            if isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], nn.BatchNorm2d):
                block[0] = fuse_conv_bn_eval(block[0].eval(), block[1].eval())
                block[1] = nn.Identity()
        return self

    def hyper_parameters(self) -> dict:
        hp = {"num_classes": self.num_classes, "width": self.width}
        if self.seg_width:
            hp.update(seg_width=self.seg_width, seg_depth=self.seg_depth)
            if self.seg_context:
                hp["seg_context"] = self.seg_context
            if self.seg_rows:
                hp["seg_rows"] = self.seg_rows
        return hp

    def encode(self, ir: torch.Tensor, vis_y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features by name: ``dec8_in`` and ``dec4_in`` (1/8 and 1/4 decoder inputs), ``f4`` (1/4 encoder) and
        ``feats`` (1/4 decoder output, read by the coefficient head; the distillation target)."""
        f2 = self.stem(torch.cat([ir, vis_y], dim=1))
        f4 = self.enc4(f2)
        f8 = self.enc8(f4)
        f16 = self.enc16(f8)
        up = F.interpolate(self.reduce16(f16), size=f8.shape[-2:], mode="bilinear", align_corners=False)
        dec8_in = torch.cat([up, f8], dim=1)
        up = F.interpolate(self.dec8(dec8_in), size=f4.shape[-2:], mode="bilinear", align_corners=False)
        dec4_in = torch.cat([up, f4], dim=1)
        return {"dec8_in": dec8_in, "dec4_in": dec4_in, "f4": f4, "feats": self.dec4(dec4_in)}

    def features(self, ir: torch.Tensor, vis_y: torch.Tensor) -> torch.Tensor:
        """Decoder features at 1/4 resolution (read by the coefficient head; the distillation target)."""
        return self.encode(ir, vis_y)["feats"]

    def fuse_with(self, feats: torch.Tensor, ir: torch.Tensor, vis_y: torch.Tensor) -> torch.Tensor:
        """Apply the coefficient head to full-resolution sources; returns fused luminance in [0, 1]."""
        size = ir.shape[-2:]
        coeff = self.coeff_head(feats) + self.coeff_offset
        coeff = F.interpolate(coeff, size=size, mode="bilinear", align_corners=False)
        m, a_ir, a_vis, c, k_ir, k_vis = coeff.unbind(dim=1)
        base = base_layer(torch.cat([ir, vis_y], dim=1))
        b_ir, b_vis = base.unbind(dim=1)
        ir1, vis1 = ir[:, 0], vis_y[:, 0]
        fused = m * torch.maximum(ir1, vis1) + a_ir * b_ir + a_vis * b_vis + c
        fused = fused + k_ir * (ir1 - b_ir) + k_vis * (vis1 - b_vis)
        return fused.unsqueeze(1).clamp(0.0, 1.0)

    def segment_with(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits of a head that reads the shared features (``seg_width`` 0, the training teachers), at ``size``."""
        return F.interpolate(self.seg_head(feats), size=size, mode="bilinear", align_corners=False)

    def head_logits(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits at the head's resolution (1/4) from ``encode``'s features (``enc["rows"]``, optional: the
        row coordinates at 1/8 of a larger image that the features were cut from; default those of the features)."""
        if not self.seg_width:
            return self.seg_head(enc["feats"])
        x = enc["f4"] if self.seg_context else enc["dec4_in"]
        if self.seg_context:
            x8 = enc["dec8_in"]
            if self.seg_rows:  # a separate 1-channel convolution: a 97-channel input is ~20% slower on the CPU
                conv, bn, relu = self.seg8[0]
                rows = enc["rows"] if "rows" in enc else row_coordinates(x8)
                x8 = self.seg8[1](relu(bn(conv(x8)) + self.seg_rows_conv(rows)))
            else:
                x8 = self.seg8(x8)
            up = F.interpolate(x8, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([up, enc["f4"]], dim=1)
        for block in self.seg4:
            x = block(x)
        return self.seg_head(x)

    def forward_with_head(self, ir: torch.Tensor, vis_y: torch.Tensor):
        """(fused, logits upsampled to the input size, logits at the head's resolution, shared 1/4 features)."""
        enc = self.encode(ir, vis_y)
        small = self.head_logits(enc)
        logits = F.interpolate(small, size=ir.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse_with(enc["feats"], ir, vis_y), logits, small, enc["feats"]

    def forward(self, ir: torch.Tensor, vis_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ir`` and ``vis_y``: N x 1 x H x W in [0, 1]. Returns (fused N x 1 x H x W, logits N x C x H x W)."""
        return self.forward_with_head(ir, vis_y)[:2]


ARCHITECTURES = {ARCHITECTURE: FusionStudent}


def build_model(architecture: str, hyper_parameters: dict) -> nn.Module:
    """Instantiate a registered architecture; raises KeyError/TypeError on unknown names or arguments."""
    return ARCHITECTURES[architecture](**hyper_parameters)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
