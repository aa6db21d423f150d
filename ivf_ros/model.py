"""The student network the node runs: IR + visible luminance in, fused luminance and class logits out.

The network looks at the pair at a quarter of its resolution and predicts, per low-resolution pixel, how to mix
the two sources: a pixel-wise maximum (the strongest trivial fusion) corrected by a base/detail decomposition, as
in decomposition-based fusion. The mixing coefficients are upsampled bilinearly and applied to the
full-resolution images, so the output keeps every source pixel's detail, has exactly the input size, and costs
only a few element-wise operations at full resolution.

    fused = m * max(ir, vis) + a_ir * base(ir) + a_vis * base(vis) + c + k_ir * detail(ir) + k_vis * detail(vis)

where base() is the area average of the image on the coefficient grid and detail() = image - base(). It is
evaluated regrouped, with the base terms on that grid: up(m) * max + up(k_ir) * ir + up(k_vis) * vis + up(level),
level = (a_ir - k_ir) * base(ir) + (a_vis - k_vis) * base(vis) + c, so only four maps are upsampled (up() is
bilinear; up(a * b) differs from up(a) * up(b) only where both vary within a grid cell).

Segmentation: with ``seg_width`` 0 (checkpoints before the distilled head) a 1x1 head on the shared 1/4 decoder
features. With ``seg_width`` > 0 the head has its own decoder path: ``seg_depth`` 3x3 blocks of ``seg_width``
channels at 1/4 on the upsampled 1/8 decoder output and the 1/4 encoder features (not the features the fusion
coefficients read), then a 1x1 classifier; logits at 1/4, upsampled bilinearly. With ``seg_context`` > 0 the
head first runs ``seg_context_depth`` (default 2) 3x3 blocks of ``seg_context`` channels at 1/8 on the 1/8
decoder input (its own context path) and its 1/4 blocks read those, upsampled, with the 1/4 encoder features.
With ``seg_rows`` 1 the 1/8 path also reads the row coordinate (0 at the top of the image, 1 at the bottom):
where in the frame a pixel lies (sky above, road below), which convolutions alone cannot see. With ``seg_chroma`` 1
it also reads the visible chroma (Cr, Cb averaged over 8 x 8 pixels, centred on neutral grey and scaled by
``CHROMA_SCALE``; neutral when no chroma is given, e.g. gray cameras): the teacher sees colour, the fusion input
only luminance. With ``seg_context16`` > 0 the 1/8 path also branches to 1/16 after its first block (a stride-2
3x3 block of ``seg_context16`` channels, then a 3x3 block back to ``seg_context``: a wider field of view), added,
upsampled bilinearly, to the input of its last block. With ``seg_context16_pool`` k > 0 the second 1/16 block also
reads a k x k average (stride 1, borders averaged over the pixels inside) of the first one's output: a still wider,
local view (not an image-level mean, which would differ between training windows and whole images). (A refinement
at 1/2 with the stem features was measured at +20 ms per 640x480 pair on 2 threads, over the time budget.)
"""
from __future__ import annotations

import cv2
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

ARCHITECTURE = "ivf_coeffnet"

# Offsets (m, a_ir, a_vis, c, k_ir, k_vis) that make a freshly initialised network a pixel-wise max fusion.
_COEFF_OFFSET = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
CHROMA_SCALE = 32.0  # MSRS visible Cr / Cb spread about 0.02 / 0.036 of the range: about unit spread after it


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def chroma_planes(chroma: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N x 2 x H x W Cr, Cb in [0, 1] (``encode``'s chroma input) from N x H x W x 2 uint8 (``split_luminance``'s
    layout); planar first: pooling and scaling interleaved planes took ~1.6x as long here."""
    return chroma.permute(0, 3, 1, 2).contiguous().to(dtype) * (1.0 / 255.0)


def row_coordinates(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W map of each row's position, (row + 0.5) / H: 0 at the top, 1 at the bottom (traceable)."""
    ones = torch.ones_like(x[:, :1])
    return (ones.cumsum(2) - 0.5) / ones.sum(2, keepdim=True)


def window_row_coordinates(top: float, frame_height: int, shape: tuple[int, int]) -> torch.Tensor:
    """1 x h x w row map of a window's 1/8 grid (``shape``) whose top row is image row ``top`` of a frame
    ``frame_height`` rows high: the whole frame's ``row_coordinates`` at 1/8, cut where the window lies (training
    crops keep their place in the frame)."""
    rows = (torch.arange(shape[0], dtype=torch.float32) + top / 8 + 0.5) / -(-frame_height // 8)
    return rows.view(1, -1, 1).expand(1, *shape).contiguous()


def grid_average(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area average of ``x`` on a ``grid`` (the coefficient grid, ceil(size / 4)): the fusion rule's base()."""
    return F.adaptive_avg_pool2d(x, grid)


def local_average(x: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """k x k average of each channel (stride 1, odd k) over the pixels inside the image: ``avg_pool2d`` with
    ``count_include_pad=False``, as a depthwise convolution with ``ones`` (C x 1 x k x k: a constant kernel, as
    ONNX export needs; ~15x faster than ``avg_pool2d`` here on 1/16 maps)."""
    k = ones.shape[-1]
    total = F.conv2d(x, ones, padding=k // 2, groups=ones.shape[0])
    return total / F.conv2d(torch.ones_like(x[:, :1]), ones[:1], padding=k // 2)


def _eager_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CPU tensor outside autograd, export, tracing and compilation: where the inference
    shortcuts below (OpenCV, data-dependent shapes) may run."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export()
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (half-pixel centres, ``align_corners=False``) of N x C x h x w maps to ``size``; on the
    CPU outside autograd by OpenCV's resize (same convention, within 1e-6; 2-4x faster here than torch's)."""
    if not _eager_cpu(x):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    n, c = x.shape[:2]
    out = torch.empty((n, c, *size), dtype=torch.float32)
    for src, dst in zip(x.float().contiguous().view(n * c, *x.shape[-2:]).numpy(), out.view(n * c, *size).numpy()):
        cv2.resize(src, (size[1], size[0]), dst=dst, interpolation=cv2.INTER_LINEAR)  # written in place
    return out.to(x.dtype)


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class ids (N x H x W, uint8 or int64) of ``logits`` (N x C x h x w) upsampled bilinearly to ``size``,
    without upsampling them where it cannot matter.

    For exactly 4x upsampling each output pixel is a convex combination of the 2 x 2 logit vectors around it, so
    where all four have the same argmax the result has it too; only the 4 x 4 output blocks of the other cells
    (class borders) are interpolated. Other sizes upsample everything. Same labels as the dense path up to
    floating-point ties.
    """
    n, c, h, w = logits.shape
    if tuple(size) != (4 * h, 4 * w) or not _eager_cpu(logits):  # nonzero() would sync a GPU, break a graph
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).argmax(-1)
    # Cell (i, j) of the grid padded by one (replicated) row and column on each side lies between padded pixels
    # i, i + 1 and j, j + 1 and covers output rows 4i-2 .. 4i+1 and columns 4j-2 .. 4j+1; border clamping of the
    # interpolation is then no special case. ri / ci map padded rows / columns to the unpadded ones.
    ri = (torch.arange(h + 2) - 1).clamp(0, h - 1)
    ci = (torch.arange(w + 2) - 1).clamp(0, w - 1)
    corners = _argmax_few(logits, 1)[:, ri][:, :, ci]
    tl = corners[:, :-1, :-1]
    mixed = (tl != corners[:, :-1, 1:]) | (tl != corners[:, 1:, :-1]) | (tl != corners[:, 1:, 1:])
    blocks = tl[..., None, None].repeat(1, 1, 1, 4, 4)  # N x (h+1) x (w+1) x 4 x 4
    cell = mixed.flatten().nonzero().squeeze(1)
    if len(cell):
        b, rest = cell // ((h + 1) * (w + 1)), cell % ((h + 1) * (w + 1))
        top, bottom = ri[rest // (w + 1)] * w + b * (h * w), ri[rest // (w + 1) + 1] * w + b * (h * w)
        left, right = ci[rest % (w + 1)], ci[rest % (w + 1) + 1]
        vectors = logits.permute(0, 2, 3, 1).reshape(-1, c)  # (N h w) x C
        vecs = vectors.index_select(0, torch.cat([top + left, top + right, bottom + left, bottom + right]))
        pixels = (_cell_weights(logits.dtype) @ vecs.view(4, -1)).view(16, len(cell), c)  # one matmul
        blocks.view(-1, 16).index_copy_(0, cell, _argmax_few(pixels, 2).T)
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, 4 * h + 4, 4 * w + 4)[:, 2:-2, 2:-2]


def _argmax_few(x: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 argmax (first maximum) over a short axis (at most 255 entries) by running comparisons: torch's argmax
    over 4 classes took 10-50x longer here."""
    planes = x.unbind(dim)
    best, ids = planes[0], torch.zeros(planes[0].shape, dtype=torch.uint8)
    for k, plane in enumerate(planes[1:], 1):
        ids.masked_fill_(plane > best, k)
        best = torch.maximum(best, plane)
    return ids


def _cell_weights(dtype: torch.dtype) -> torch.Tensor:
    """16 x 4 bilinear weights of a cell's 4 x 4 output pixels (row-major) on its corners (top-left, top-right,
    bottom-left, bottom-right) at 4x upsampling (sample offsets 1/8, 3/8, 5/8, 7/8)."""
    f = (torch.arange(4, dtype=torch.float64) + 0.5) / 4
    axis = torch.stack([1 - f, f], 1)  # 4 x 2: weights of the near and far corner along one axis
    return torch.einsum("ya,xb->yxab", axis, axis).reshape(16, 4).to(dtype)


class FusionStudent(nn.Module):
    """Fast fusion + segmentation network; see the module docstring for the fusion rule."""

    architecture = ARCHITECTURE
    # Hyper-parameter -> (type, smallest, largest) a checkpoint may ask for; checked before the model is built.
    # 255 classes at most: class ids travel as uint8 (255 is the training IGNORE label).
    hyper_parameter_limits = {"num_classes": (int, 1, 255), "width": (int, 1, 256), "seg_width": (int, 0, 256),
                              "seg_depth": (int, 1, 8), "seg_context": (int, 0, 256),
                              "seg_context_depth": (int, 1, 8),
                              "seg_rows": (int, 0, 1), "seg_chroma": (int, 0, 1),
                              "seg_context16": (int, 0, 256), "seg_context16_pool": (int, 0, 15)}

    def __init__(self, num_classes: int = 4, width: int = 16, seg_width: int = 0, seg_depth: int = 1,
                 seg_context: int = 0, seg_rows: int = 0, seg_chroma: int = 0,
                 seg_context_depth: int = 2, seg_context16: int = 0, seg_context16_pool: int = 0):
        super().__init__()
        w = width
        if seg_width and seg_depth < 1:
            raise ValueError(f"seg_depth must be at least 1, not {seg_depth}")
        self.num_classes = num_classes
        self.width = width
        if seg_rows and not (seg_width and seg_context):
            raise ValueError("seg_rows needs the 1/8 context path (seg_width and seg_context > 0)")
        if seg_chroma and not (seg_width and seg_context):
            raise ValueError("seg_chroma needs the 1/8 context path (seg_width and seg_context > 0)")
        self.seg_width, self.seg_depth, self.seg_context, self.seg_rows = seg_width, seg_depth, seg_context, seg_rows
        if seg_context16 and not (seg_width and seg_context and seg_context_depth >= 2):
            raise ValueError("seg_context16 needs a 1/8 context path of at least 2 blocks (seg_width, seg_context)")
        if seg_context16_pool and not (seg_context16 and seg_context16_pool % 2):
            raise ValueError(f"seg_context16_pool {seg_context16_pool}: an odd kernel, with seg_context16 > 0")
        self.seg_chroma, self.seg_context_depth, self.seg_context16 = seg_chroma, seg_context_depth, seg_context16
        self.seg_context16_pool = seg_context16_pool
        self.stem = _block(2, w, stride=2)  # 1/2
        self.enc4 = nn.Sequential(_block(w, 2 * w, stride=2), _block(2 * w, 2 * w))  # 1/4
        self.enc8 = nn.Sequential(_block(2 * w, 4 * w, stride=2), _block(4 * w, 4 * w))  # 1/8
        self.enc16 = nn.Sequential(_block(4 * w, 4 * w, stride=2), _block(4 * w, 4 * w))  # 1/16, context
        self.reduce16 = nn.Conv2d(4 * w, 2 * w, 1)  # 1x1 before upsampling keeps the decoder cheap
        self.dec8 = _block(6 * w, 2 * w)
        self.dec4 = _block(4 * w, 2 * w)
        self.coeff_head = nn.Conv2d(2 * w, len(_COEFF_OFFSET), 3, padding=1)
        if seg_width and seg_context:  # own 1/8 path on dec8's input
            self.seg8 = nn.Sequential(_block(6 * w, seg_context),
                                      *[_block(seg_context, seg_context) for _ in range(seg_context_depth - 1)])
            if seg_context16:  # 1/16 branch of the first block's output, added before the last block
                self.seg16 = nn.Sequential(_block(seg_context, seg_context16, stride=2),
                                           _block(seg_context16 * (2 if seg_context16_pool else 1), seg_context))
                if seg_context16_pool:  # local_average's kernel, a buffer of the branch (moves and casts with it)
                    k = seg_context16_pool
                    self.seg16.register_buffer("ones", torch.ones(seg_context16, 1, k, k), persistent=False)
            if seg_rows:  # the rows' term, added after the first block's BatchNorm (folding leaves it alone)
                self.seg_rows_conv = nn.Conv2d(1, seg_context, 3, padding=1, bias=False)
            if seg_chroma:  # likewise the chroma's term
                self.seg_chroma_conv = nn.Conv2d(2, seg_context, 3, padding=1, bias=False)
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
                if self.seg_context_depth != 2:
                    hp["seg_context_depth"] = self.seg_context_depth
                if self.seg_context16:
                    hp["seg_context16"] = self.seg_context16
                if self.seg_context16_pool:
                    hp["seg_context16_pool"] = self.seg_context16_pool
            if self.seg_rows:
                hp["seg_rows"] = self.seg_rows
            if self.seg_chroma:
                hp["seg_chroma"] = self.seg_chroma
        return hp

    def encode(self, ir: torch.Tensor, vis_y: torch.Tensor,
               chroma: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Features by name: ``dec8_in`` and ``dec4_in`` (1/8 and 1/4 decoder inputs), ``f4`` (1/4 encoder),
        ``feats`` (1/4 decoder output, read by the coefficient head; the distillation target) and, with
        ``seg_chroma``, ``chroma`` (the head's chroma input at 1/8 from N x 2 x H x W Cr, Cb in [0, 1])."""
        f2 = self.stem(torch.cat([ir, vis_y], dim=1))
        f4 = self.enc4(f2)
        f8 = self.enc8(f4)
        f16 = self.enc16(f8)
        up = F.interpolate(self.reduce16(f16), size=f8.shape[-2:], mode="bilinear", align_corners=False)
        dec8_in = torch.cat([up, f8], dim=1)
        up = F.interpolate(self.dec8(dec8_in), size=f4.shape[-2:], mode="bilinear", align_corners=False)
        dec4_in = torch.cat([up, f4], dim=1)
        enc = {"dec8_in": dec8_in, "dec4_in": dec4_in, "f4": f4, "feats": self.dec4(dec4_in)}
        if self.seg_chroma and chroma is not None:
            # 8 x 8 averages (clipped at the border): the 1/8 grid, ceil(size / 8), as one exportable op
            enc["chroma"] = (F.avg_pool2d(chroma, 8, ceil_mode=True) - 0.5) * CHROMA_SCALE
        return enc

    def features(self, ir: torch.Tensor, vis_y: torch.Tensor) -> torch.Tensor:
        """Decoder features at 1/4 resolution (read by the coefficient head; the distillation target)."""
        return self.encode(ir, vis_y)["feats"]

    def fuse_with(self, feats: torch.Tensor, ir: torch.Tensor, vis_y: torch.Tensor) -> torch.Tensor:
        """Apply the coefficient head to full-resolution sources; returns fused luminance in [0, 1]."""
        coeff = self.coeff_head(feats) + self.coeff_offset
        m, a_ir, a_vis, c, k_ir, k_vis = coeff.unbind(dim=1)
        base_ir, base_vis = grid_average(torch.cat([ir, vis_y], dim=1), coeff.shape[-2:]).unbind(dim=1)
        level = (a_ir - k_ir) * base_ir + (a_vis - k_vis) * base_vis + c
        maps = torch.stack([m, k_ir, k_vis, level], dim=1)  # contiguous planes: upsampled 2x faster than NHWC
        m, k_ir, k_vis, level = upsample(maps, ir.shape[-2:]).unbind(dim=1)
        ir1, vis1 = ir[:, 0], vis_y[:, 0]
        fused = torch.addcmul(level, m, torch.maximum(ir1, vis1))  # fused multiply-adds: fewer full-size passes
        fused = torch.addcmul(torch.addcmul(fused, k_ir, ir1), k_vis, vis1)
        return fused.unsqueeze(1).clamp(0.0, 1.0)

    def fuse_and_label(self, ir: torch.Tensor, vis_y: torch.Tensor,
                       chroma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused N x 1 x H x W, class ids N x H x W): the inference path, labels by ``upsampled_argmax``."""
        enc = self.encode(ir, vis_y, chroma)
        return self.fuse_with(enc["feats"], ir, vis_y), upsampled_argmax(self.head_logits(enc).float(), ir.shape[-2:])

    def segment_with(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits of a head that reads the shared features (``seg_width`` 0, the training teachers), at ``size``."""
        return F.interpolate(self.seg_head(feats), size=size, mode="bilinear", align_corners=False)

    def head_logits(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits at the head's resolution (1/4) from ``encode``'s features (``enc["rows"]``, optional: the
        row coordinates at 1/8 of a larger image that the features were cut from; default those of the features;
        ``enc["chroma"]``, optional: neutral without it). Runs in the head's dtype (see ``head_to``)."""
        dtype = self.seg_head.weight.dtype
        if not self.seg_width:
            return self.seg_head(enc["feats"].to(dtype))
        x = (enc["f4"] if self.seg_context else enc["dec4_in"]).to(dtype)
        if self.seg_context:
            x8 = enc["dec8_in"].to(dtype)
            if self.seg_rows or self.seg_chroma:  # separate convolutions: a 97-channel input is ~20% slower here
                conv, bn, relu = self.seg8[0]
                y8 = bn(conv(x8))
                if self.seg_rows:
                    y8 = y8 + self.seg_rows_conv(enc["rows"].to(dtype) if "rows" in enc else row_coordinates(x8))
                if self.seg_chroma and "chroma" in enc:  # neutral chroma (0) adds nothing
                    y8 = y8 + self.seg_chroma_conv(enc["chroma"].to(dtype))
                x8 = self._seg8_rest(relu(y8))
            else:
                x8 = self._seg8_rest(self.seg8[0](x8))
            up = F.interpolate(x8, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([up, x], dim=1)
        for block in self.seg4:
            x = block(x)
        return self.seg_head(x)

    def head_to(self, dtype: torch.dtype) -> "FusionStudent":
        """Cast the segmentation head (the ``seg*`` modules) to ``dtype``, e.g. bfloat16 for inference on CPUs with
        native bfloat16; the fusion path keeps its own dtype, so fused images do not change."""
        for name, module in self.named_children():
            if name.startswith("seg"):
                module.to(dtype)
        return self

    @property
    def head_alignment(self) -> int:
        """The coarsest grid the head's own path reads (16 with the 1/16 branch, else 8): windows cut from
        whole-image features must start on it to see the grid the whole image gives."""
        return 16 if self.seg_context16 else 8

    def _seg8_rest(self, x8: torch.Tensor) -> torch.Tensor:
        """The 1/8 path after its first block; with ``seg_context16`` the 1/16 branch, upsampled, is added to the
        input of its last block (adding costs less than concatenating: ~1/3 of the head's time at 48 channels)."""
        if not self.seg_context16:
            return self.seg8[1:](x8)
        x16 = self.seg16[0](x8)
        if self.seg_context16_pool:
            x16 = torch.cat([x16, local_average(x16, self.seg16.ones)], dim=1)
        x16 = self.seg16[1](x16)
        x8 = self.seg8[1:-1](x8)
        return self.seg8[-1](x8 + upsample(x16, x8.shape[-2:]))

    def forward_with_head(self, ir: torch.Tensor, vis_y: torch.Tensor, chroma: torch.Tensor | None = None,
                          rows: torch.Tensor | None = None):
        """(fused, logits upsampled to the input size, logits at the head's resolution, shared 1/4 features);
        ``rows``: optional N x 1 x h x w row map at 1/8 (``head_logits``'s ``enc["rows"]``)."""
        enc = self.encode(ir, vis_y, chroma)
        if rows is not None:
            enc["rows"] = rows
        small = self.head_logits(enc)
        logits = F.interpolate(small, size=ir.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse_with(enc["feats"], ir, vis_y), logits, small, enc["feats"]

    def forward(self, ir: torch.Tensor, vis_y: torch.Tensor,
                chroma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``ir`` and ``vis_y``: N x 1 x H x W in [0, 1]; ``chroma`` (optional, read with ``seg_chroma``): the
        visible Cr, Cb, N x 2 x H x W in [0, 1]. Returns (fused N x 1 x H x W, logits N x C x H x W)."""
        return self.forward_with_head(ir, vis_y, chroma)[:2]


ARCHITECTURES = {ARCHITECTURE: FusionStudent}


def build_model(architecture: str, hyper_parameters: dict) -> nn.Module:
    """Instantiate a registered architecture; raises KeyError/TypeError on unknown names or arguments."""
    return ARCHITECTURES[architecture](**hyper_parameters)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
