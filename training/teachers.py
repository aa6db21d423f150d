"""Teachers (training only; the node never imports this): large fusion + segmentation networks with priors.

* ``SageTeacher`` (after SAGE, Wu et al., CVPR 2025): IR + visible features meet the cached priors
  (``training.priors.teacher_input``: regions and objects, with ``mfnet`` priors also MFNet's class masks and
  decoder embeddings) in Semantic Persistent Attention blocks: image tokens attend to prior tokens and to a
  persistent repository that keeps the source (IR, visible) features of the encoder unchanged, so the fusion never
  loses what the sources said while it follows the semantic prior.
* ``FusionSamTeacher`` (after FusionSAM, Li et al. 2024): vector-quantised latent tokens per modality,
  cross-attention fusion into a fusion mask, SAM's prompt encoder and mask decoder prompted with points and boxes
  (of the prior's object masks; with MFNet class masks, of each object class's connected components).

Prior-fed teachers take ``prior_channels`` full-resolution prior channels followed by ``embedding_dim`` embedding
channels (``training.distill`` sets both from the prior cache and ``prior_inputs``).
* ``TextTeacher`` (textual-prior distillation): separate IR and visible encoders, spatial-channel cross fusion,
  and FiLM modulation ``(1 + gamma(T)) * F + beta(T)`` by the sentence embedding T of the scene description.

All end in the student's heads (the same fusion rule and segmentation head, on wider features at 1/4
resolution), return ``(fused, logits, features)`` and take ``(ir, vis_y, condition)``.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ivf_ros.model import _COEFF_OFFSET, FusionStudent, _block

from .mfnet import MFNET_CLASSES
from .priors import MFNET_OBJECTS, PRIOR_CHANNELS, SEMANTIC_CHANNELS

TEACHER_KEY = "ivf_ros_teacher"


def _encoder(cin: int, w: int) -> nn.Sequential:
    """Full resolution -> 1/4, ``2 * w`` channels."""
    return nn.Sequential(_block(cin, w), _block(w, w, stride=2), _block(w, 2 * w, stride=2), _block(2 * w, 2 * w))


class _Heads(nn.Module):
    """The student's fusion and segmentation heads on ``feature_channels`` channels at 1/4 resolution."""

    fuse_with = FusionStudent.fuse_with
    segment_with = FusionStudent.segment_with

    def _make_heads(self, channels: int, num_classes: int) -> None:
        self.feature_channels = channels
        self.coeff_head = nn.Conv2d(channels, len(_COEFF_OFFSET), 3, padding=1)
        self.seg_head = nn.Sequential(_block(channels, channels), nn.Conv2d(channels, num_classes, 1))
        nn.init.zeros_(self.coeff_head.weight)
        nn.init.zeros_(self.coeff_head.bias)
        self.register_buffer("coeff_offset", torch.tensor(_COEFF_OFFSET).view(1, -1, 1, 1), persistent=False)

    def forward(self, ir: torch.Tensor, vis_y: torch.Tensor, condition: torch.Tensor):
        """Returns (fused N x 1 x H x W, logits N x C x H x W, features N x feature_channels x H/4 x W/4)."""
        feats = self.features(ir, vis_y, condition)
        return self.fuse_with(feats, ir, vis_y), self.segment_with(feats, ir.shape[-2:]), feats


class SemanticPersistentAttention(nn.Module):
    """Image tokens attend to [prior tokens; persistent repository of source tokens]; residual + MLP.
    Without a repository it is plain cross-attention from ``x`` to the tokens of ``prior``.

    Keys and values are pooled to ``grid`` x ``grid`` tokens per source, so the cost grows linearly with the image.
    """

    def __init__(self, dim: int, heads: int = 4, grid: int = 12):
        super().__init__()
        self.grid = grid
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.source_embed = nn.Parameter(torch.zeros(3, 1, dim))  # prior, IR repository, visible repository
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, prior: torch.Tensor, repository: tuple[torch.Tensor, ...] = ()):
        n, c, h, w = x.shape
        q = x.flatten(2).transpose(1, 2)
        kv = torch.cat([self.tokens(t) + e for t, e in zip((prior, *repository), self.source_embed)], dim=1)
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        q = q + self.mlp(q)
        return q.transpose(1, 2).reshape(n, c, h, w)


def split_prior(prior: torch.Tensor, hp: dict, size) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(full-resolution prior channels, embedding channels averaged to ``size`` or None) of a teacher's input."""
    masks, dim = hp["prior_channels"], hp["embedding_dim"]
    if prior.shape[1] != masks + dim:
        raise ValueError(f"prior tensor has {prior.shape[1]} channels, the teacher takes {masks} + {dim} embedding")
    return prior[:, :masks], F.adaptive_avg_pool2d(prior[:, masks:], size) if dim else None


class SageTeacher(_Heads):
    """Prior-guided fusion teacher; ``condition`` is the prior tensor N x (prior_channels + embedding_dim) x H x W.
    The embeddings (MFNet decoder features) join the prior tokens of the attention."""

    name = "sage"

    def __init__(self, num_classes: int = 4, width: int = 32, heads: int = 4, blocks: int = 2, grid: int = 12,
                 prior_channels: int = PRIOR_CHANNELS, embedding_dim: int = 0):
        super().__init__()
        self.hp = {"num_classes": num_classes, "width": width, "heads": heads, "blocks": blocks, "grid": grid,
                   "prior_channels": prior_channels, "embedding_dim": embedding_dim}
        w = width
        self.enc_ir, self.enc_vis = _encoder(1, w), _encoder(1, w)
        self.enc_prior = _encoder(prior_channels, w)
        self.embed = nn.Conv2d(embedding_dim, 4 * w, 1) if embedding_dim else None
        self.down = _block(4 * w, 4 * w, stride=2)  # joint IR+visible features, 1/8
        self.to_tokens = nn.ModuleDict({k: nn.Conv2d(2 * w, 4 * w, 1) for k in ("ir", "vis", "prior")})
        self.spa = nn.ModuleList(SemanticPersistentAttention(4 * w, heads, grid) for _ in range(blocks))
        self.dec = nn.Sequential(_block(4 * w + 4 * w + 2 * w, 4 * w), _block(4 * w, 4 * w))
        self._make_heads(4 * w, num_classes)

    def features(self, ir: torch.Tensor, vis_y: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        f_ir, f_vis = self.enc_ir(ir), self.enc_vis(vis_y)
        masks, embeddings = split_prior(prior, self.hp, f_ir.shape[-2:])
        f_prior = self.enc_prior(masks)
        joint = torch.cat([f_ir, f_vis], dim=1)
        x = self.down(joint)
        repository = (self.to_tokens["ir"](f_ir), self.to_tokens["vis"](f_vis))
        prior_tokens = self.to_tokens["prior"](f_prior)
        if self.embed is not None:
            prior_tokens = prior_tokens + self.embed(embeddings)
        for block in self.spa:
            x = block(x, prior_tokens, repository)
        x = F.interpolate(x, size=joint.shape[-2:], mode="bilinear", align_corners=False)
        return self.dec(torch.cat([x, joint, f_prior], dim=1))


class FiLM(nn.Module):
    """(1 + gamma(t)) * F + beta(t), starting as the identity."""

    def __init__(self, text_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(text)[..., None, None].chunk(2, dim=1)
        return (1 + gamma) * x + beta


class SpatialChannelCrossFusion(nn.Module):
    """Each modality is re-weighted by the other's channel attention; a joint spatial map mixes them."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.channel = nn.ModuleDict({k: nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                                       nn.Linear(hidden, channels)) for k in ("ir", "vis")})
        self.spatial = nn.Conv2d(4, 1, 7, padding=3)
        self.out = _block(3 * channels, channels)

    def forward(self, f_ir: torch.Tensor, f_vis: torch.Tensor) -> torch.Tensor:
        a_ir = torch.sigmoid(self.channel["ir"](f_ir.mean((2, 3))))[..., None, None]
        a_vis = torch.sigmoid(self.channel["vis"](f_vis.mean((2, 3))))[..., None, None]
        x_ir, x_vis = f_ir * (1 + a_vis), f_vis * (1 + a_ir)
        stats = torch.cat([x_ir.mean(1, keepdim=True), x_ir.amax(1, keepdim=True),
                           x_vis.mean(1, keepdim=True), x_vis.amax(1, keepdim=True)], dim=1)
        s = torch.sigmoid(self.spatial(stats))
        return self.out(torch.cat([s * x_ir + (1 - s) * x_vis, x_ir, x_vis], dim=1))


class TextTeacher(_Heads):
    """Text-guided fusion teacher; ``condition`` is the description embedding N x text_dim."""

    name = "text"

    def __init__(self, num_classes: int = 4, width: int = 32, text_dim: int = 384):
        super().__init__()
        self.hp = {"num_classes": num_classes, "width": width, "text_dim": text_dim}
        w = width
        self.enc_ir, self.enc_vis = _encoder(1, w), _encoder(1, w)
        self.down_ir, self.down_vis = _block(2 * w, 4 * w, stride=2), _block(2 * w, 4 * w, stride=2)
        self.film4 = nn.ModuleDict({k: FiLM(text_dim, 2 * w) for k in ("ir", "vis")})
        self.film8 = nn.ModuleDict({k: FiLM(text_dim, 4 * w) for k in ("ir", "vis")})
        self.cross4, self.cross8 = SpatialChannelCrossFusion(2 * w), SpatialChannelCrossFusion(4 * w)
        self.film_out = FiLM(text_dim, 4 * w)
        self.dec = nn.Sequential(_block(4 * w + 2 * w, 4 * w), _block(4 * w, 4 * w))
        self._make_heads(4 * w, num_classes)

    def features(self, ir: torch.Tensor, vis_y: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        f_ir = self.film4["ir"](self.enc_ir(ir), text)
        f_vis = self.film4["vis"](self.enc_vis(vis_y), text)
        g_ir = self.film8["ir"](self.down_ir(f_ir), text)
        g_vis = self.film8["vis"](self.down_vis(f_vis), text)
        deep = self.cross8(g_ir, g_vis)
        deep = F.interpolate(deep, size=f_ir.shape[-2:], mode="bilinear", align_corners=False)
        return self.film_out(self.dec(torch.cat([deep, self.cross4(f_ir, f_vis)], dim=1)), text)


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantisation with a straight-through gradient; ``loss`` holds the VQ-VAE codebook and
    commitment terms of the last forward pass."""

    def __init__(self, codes: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.codebook = nn.Embedding(codes, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codes, 1.0 / codes)
        self.beta = beta
        self.loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(-1, c)
        index = torch.cdist(flat, self.codebook.weight).argmin(1)
        q = self.codebook(index).view(n, h, w, c).permute(0, 3, 1, 2)
        self.loss = F.mse_loss(q, x.detach()) + self.beta * F.mse_loss(x, q.detach())
        return x + (q - x).detach()


def object_prompts(masks: torch.Tensor, max_prompts: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image of ``masks`` (N x K x H x W, one mask per object class): (boxes P x 4, centroid points P x 2, mask
    channels P) of the ``max_prompts`` largest connected components of any class, in pixels."""
    prompts = []
    for image in (masks > 0.5).to(torch.uint8).cpu().numpy():
        found = []  # (area, box, centroid, channel)
        for k, mask in enumerate(image):
            count, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
            found += [(stats[i, cv2.CC_STAT_AREA], [stats[i, 0], stats[i, 1], stats[i, 0] + stats[i, 2],
                                                    stats[i, 1] + stats[i, 3]], centroids[i], k)
                      for i in range(1, count)]
        found = sorted(found, key=lambda f: -f[0])[:max_prompts]
        prompts.append((torch.from_numpy(np.array([f[1] for f in found], np.float32).reshape(-1, 4)),
                        torch.from_numpy(np.array([f[2] for f in found], np.float32).reshape(-1, 2)),
                        torch.tensor([f[3] for f in found], dtype=torch.long)))
    return prompts


# The one-hot channels of MFNet's object classes in a prior tensor with semantic masks (see training.priors).
OBJECT_CHANNELS = [PRIOR_CHANNELS + MFNET_CLASSES.index(name) for name in MFNET_OBJECTS]


class FusionSamTeacher(_Heads):
    """FusionSAM-style segmentation teacher; ``condition`` is the prior tensor N x (prior_channels +
    embedding_dim) x H x W. The prompts are the boxes and centre points of the connected components of its object
    channel, or, when it holds MFNet's class masks (``prior_channels`` > 4), of each MFNet object class (person,
    bike, car) apart; embeddings (MFNet decoder features) are added to the image embedding of SAM's decoder.

    Each modality is encoded and vector-quantised into latent tokens; cross-attention between the two token sets
    fuses them and predicts a fusion mask. SAM's prompt encoder (box + point prompts, the fusion mask as the dense
    mask prompt) and mask decoder (``segment_anything.modeling``) turn the fused latent into one object mask per
    prompt; the masks raise the object classes of the segmentation logits: all of them alike, or, with
    ``class_evidence`` (needs MFNet's class masks), each prompt's mask only its own MFNet class's. Prompt coordinates are scaled into a
    ``16 * grid`` square frame, as SAM sees a 1024 px image on a 64 x 64 grid. ``sam_checkpoint`` (optional) loads
    the prompt encoder and mask decoder from a SAM checkpoint (needs ``sam_dim`` 256).
    """

    name = "fusionsam"

    def __init__(self, num_classes: int = 4, width: int = 32, codes: int = 256, heads: int = 4, grid: int = 16,
                 sam_dim: int = 64, max_prompts: int = 8, sam_checkpoint: str | None = None,
                 prior_channels: int = PRIOR_CHANNELS, embedding_dim: int = 0, class_evidence: bool = False):
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        super().__init__()
        if prior_channels not in (PRIOR_CHANNELS, PRIOR_CHANNELS + SEMANTIC_CHANNELS):
            raise ValueError(f"prior_channels {prior_channels}: {PRIOR_CHANNELS}, or "
                             f"{PRIOR_CHANNELS + SEMANTIC_CHANNELS} with MFNet class masks")
        if class_evidence and (prior_channels == PRIOR_CHANNELS or num_classes != 1 + len(OBJECT_CHANNELS)):
            raise ValueError(f"class_evidence needs MFNet's class masks (prior_channels "
                             f"{PRIOR_CHANNELS + SEMANTIC_CHANNELS}) and {1 + len(OBJECT_CHANNELS)} classes")
        self.hp = {"num_classes": num_classes, "width": width, "codes": codes, "heads": heads, "grid": grid,
                   "sam_dim": sam_dim, "max_prompts": max_prompts, "sam_checkpoint": sam_checkpoint,
                   "prior_channels": prior_channels, "embedding_dim": embedding_dim, "class_evidence": class_evidence}
        c = 2 * width
        self.enc_ir, self.enc_vis = _encoder(1, width), _encoder(1, width)
        self.vq_ir, self.vq_vis = VectorQuantizer(codes, c), VectorQuantizer(codes, c)
        self.cross_ir = SemanticPersistentAttention(c, heads, grid)  # IR tokens attend to visible tokens
        self.cross_vis = SemanticPersistentAttention(c, heads, grid)
        self.fuse = _block(2 * c, 2 * c)
        self.fusion_mask = nn.Conv2d(2 * c, 1, 3, padding=1)
        self.to_sam = nn.Conv2d(2 * c, sam_dim, 1)
        self.embed = nn.Conv2d(embedding_dim, sam_dim, 1) if embedding_dim else None
        self.prompt_encoder = PromptEncoder(embed_dim=sam_dim, image_embedding_size=(grid, grid),
                                            input_image_size=(16 * grid, 16 * grid), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=sam_dim,
                                        transformer=TwoWayTransformer(depth=2, embedding_dim=sam_dim,
                                                                      mlp_dim=4 * sam_dim, num_heads=8))
        if sam_checkpoint:
            state = torch.load(sam_checkpoint, map_location="cpu", weights_only=True)
            for prefix, module in (("prompt_encoder.", self.prompt_encoder), ("mask_decoder.", self.mask_decoder)):
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self._make_heads(2 * c, num_classes)

    @property
    def aux_loss(self) -> torch.Tensor:
        """Vector-quantisation loss of the last forward pass (added to the teacher's training loss)."""
        return self.vq_ir.loss + self.vq_vis.loss

    def features(self, ir: torch.Tensor, vis_y: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Fused latent at 1/4 resolution (the prior only prompts the decoder in ``forward``)."""
        t_ir, t_vis = self.vq_ir(self.enc_ir(ir)), self.vq_vis(self.enc_vis(vis_y))
        f_ir, f_vis = self.cross_ir(t_ir, t_vis), self.cross_vis(t_vis, t_ir)
        return self.fuse(torch.cat([f_ir, f_vis], dim=1))

    def forward(self, ir: torch.Tensor, vis_y: torch.Tensor, prior: torch.Tensor):
        feats = self.features(ir, vis_y, prior)
        logits = self.segment_with(feats, ir.shape[-2:])
        size, g = ir.shape[-2:], self.hp["grid"]
        embedding = self.to_sam(F.interpolate(feats, size=(g, g), mode="bilinear", align_corners=False))
        masks, embeddings = split_prior(prior, self.hp, (g, g))
        if self.embed is not None:
            embedding = embedding + self.embed(embeddings)
        objects = masks[:, OBJECT_CHANNELS] if self.hp["prior_channels"] > PRIOR_CHANNELS else masks[:, 3:4]
        dense_mask = F.interpolate(self.fusion_mask(feats), size=(4 * g, 4 * g), mode="bilinear",
                                   align_corners=False)
        scale = torch.tensor([16 * g / size[1], 16 * g / size[0]], device=ir.device)
        by_class = self.hp["class_evidence"]
        evidence = torch.zeros(len(ir), objects.shape[1] if by_class else 1, *size, device=ir.device)
        for i, (boxes, points, channels) in enumerate(object_prompts(objects, self.hp["max_prompts"])):
            if len(boxes) == 0:
                continue
            boxes, points = boxes.to(ir.device) * scale.repeat(2), points.to(ir.device) * scale
            sparse, dense = self.prompt_encoder(points=(points[:, None], torch.ones(len(points), 1, device=ir.device)),
                                                boxes=boxes, masks=dense_mask[i:i + 1].expand(len(boxes), -1, -1, -1))
            masks, _ = self.mask_decoder(embedding[i:i + 1], self.prompt_encoder.get_dense_pe(), sparse, dense,
                                         multimask_output=False)
            masks = F.softplus(F.interpolate(masks, size=size, mode="bilinear", align_corners=False))[:, 0]
            if by_class:
                for k in channels.unique().tolist():
                    evidence[i, k] = masks[channels == k].amax(0)
            else:
                evidence[i, 0] = masks.amax(0)
        logits = torch.cat([logits[:, :1], logits[:, 1:] + evidence], dim=1)
        return self.fuse_with(feats, ir, vis_y), logits, feats


TEACHERS = {SageTeacher.name: SageTeacher, TextTeacher.name: TextTeacher, FusionSamTeacher.name: FusionSamTeacher}


def build_teacher(name: str, hyper_parameters: dict) -> _Heads:
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher '{name}' (known: {', '.join(TEACHERS)})")
    return TEACHERS[name](**hyper_parameters)


def saved_hyper_parameters(meta: dict) -> dict:
    """A teacher file's hyper-parameters, with the defaults of those added after it was saved."""
    defaults = {k: p.default for k, p in inspect.signature(TEACHERS[meta["teacher"]]).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **meta["hyper_parameters"]}


def save_teacher(path: str | Path, teacher: _Heads, metadata: dict) -> Path:
    """Teacher weights + JSON metadata (name, hyper-parameters, conditioning) in one safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": teacher.name, "hyper_parameters": teacher.hp, **metadata}
    tensors = {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
    save_file(tensors, str(path), metadata={TEACHER_KEY: json.dumps(meta)})
    return path


def read_teacher_metadata(path: str | Path) -> dict | None:
    """The teacher metadata of a safetensors file, or None when it is not a teacher file."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    return json.loads(header[TEACHER_KEY]) if TEACHER_KEY in header else None


def load_teacher(path: str | Path) -> tuple[_Heads, dict]:
    meta = read_teacher_metadata(path)
    if meta is None:
        raise ValueError(f"{path}: not a teacher file (no '{TEACHER_KEY}' metadata)")
    hp = {k: v for k, v in meta["hyper_parameters"].items() if k != "sam_checkpoint"}  # weights are in the file
    teacher = build_teacher(meta["teacher"], hp)
    teacher.load_state_dict(load_file(str(path)))
    return teacher.eval(), meta
