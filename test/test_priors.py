"""Semantic prior cache: the real segment-anything code path with a small random SAM, the classic source, the
mfnet source on real pairs against MFNet's reference maps, the CLI."""
import json
from functools import partial

import cv2
import numpy as np
import pytest
import torch

from ivf_ros.data import data_root
from training.datasets import Sample, load_pairs
from training.mfnet import MFNET_CLASSES, teacher_dir
from training.priors import (SEMANTIC_CHANNELS, ClassicPriors, MfnetPriors, Prior, PriorCache, SamPriors,
                             class_regions, load_sam, main, mfnet_objects, paint_regions, prior_channels,
                             teacher_input)

torch.set_num_threads(1)
MSRS = data_root() / "msrs"
needs_data = pytest.mark.skipif(not MSRS.is_dir(), reason=f"shared data not found at {MSRS} (set IVF_DATA)")
MFNET = teacher_dir()
needs_mfnet = pytest.mark.skipif(not (MSRS.is_dir() and (MFNET / "reference").is_dir()),
                                 reason=f"shared data or MFNet teacher not found at {MSRS}, {MFNET} (set IVF_DATA)")


def tiny_sam():
    """A randomly initialised SAM built from segment_anything.modeling (64 px input, 32-d, one block)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    d = 32
    encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=d, depth=1, num_heads=2, out_chans=d,
                              qkv_bias=True, use_rel_pos=True, window_size=0, global_attn_indexes=(0,),
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    prompt = PromptEncoder(embed_dim=d, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=d, iou_head_depth=1, iou_head_hidden_dim=d,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=d, mlp_dim=64, num_heads=2))
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).eval()


def shared_pairs(n=2):
    stems = sorted(p.stem for p in (MSRS / "ir").iterdir())[:n]
    return load_pairs(MSRS, "pairs", stems=stems)


@needs_data
def test_sam_prior_cache_round_trip_on_shared_pairs(tmp_path):
    samples = shared_pairs(2)
    assert all(s.boxes for s in samples), "the first MSRS pairs have boxes"
    sam_priors = SamPriors(tiny_sam(), points_per_side=3, inputs=("vis",), pred_iou_thresh=0.0,
                           stability_score_thresh=0.0)
    calls = []

    def compute(s):
        calls.append(s.stem)
        return sam_priors(s)

    cache = PriorCache(tmp_path / "cache")
    assert cache.build("msrs", samples, compute, {"source": "sam", "description": "random tiny SAM"}, False) == 2
    assert cache.build("msrs", samples, compute, {"source": "sam", "description": "random tiny SAM"}, False) == 0
    assert calls == [s.stem for s in samples]  # SAM never runs twice for a pair
    assert cache.meta()["source"] == "sam" and cache.meta()["description"] == "random tiny SAM"
    again = sam_priors(samples[0])  # deterministic: the cache holds exactly what SAM gave
    np.testing.assert_array_equal(cache.load("msrs", samples[0].stem).regions, again.regions)
    np.testing.assert_array_equal(cache.load("msrs", samples[0].stem).objects, again.objects)
    for s in samples:
        prior = cache.load("msrs", s.stem)
        assert prior.regions.shape == prior.objects.shape == s.ir.shape
        assert prior.regions.max() >= 1  # the generator's masks made it into the region map
        assert set(np.unique(prior.objects)) <= {0} | {int(b[0]) + 1 for b in s.boxes}
        assert prior.objects.any()  # the box prompts gave object masks
        ch = prior_channels(prior, s.ir, s.vis[..., 1])
        assert ch.shape == (4, *s.ir.shape) and ch.min() >= 0 and ch.max() <= 1


def test_load_sam_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such SAM checkpoint"):
        load_sam("vit_b", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown SAM model"):
        load_sam("vit_xxl", tmp_path / "missing.pth")


def test_classic_priors_find_a_warm_object_in_its_box():
    rng = np.random.default_rng(0)
    ir = np.clip(rng.normal(60, 5, (96, 128)), 0, 255).astype(np.uint8)
    ir[30:70, 50:80] = 220
    vis = np.dstack([np.clip(rng.normal(100, 5, (96, 128)), 0, 255).astype(np.uint8)] * 3)
    box = (0, 40.0, 20.0, 90.0, 80.0)  # person box around the warm block
    prior = ClassicPriors(region_size=16)(Sample("x", ir, vis, None, [box]))
    assert prior.regions.min() >= 1  # every pixel belongs to a superpixel
    obj = prior.objects == 1
    assert obj[30:70, 50:80].mean() > 0.8 and obj[:, :40].sum() == 0 and obj[:, 91:].sum() == 0


def test_region_map_keeps_small_masks_on_top_and_channels_follow_regions():
    big, small = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    big[:, :6], small[2:4, 2:4] = True, True
    regions = paint_regions([small, big], (8, 8))
    assert len(np.unique(regions[small])) == 1 and regions[small][0] != regions[0, 0]
    ir = np.zeros((8, 8), np.uint8)
    ir[small] = 255
    ch = prior_channels(Prior(regions, np.zeros((8, 8), np.uint8)), ir, ir)
    assert ch[1][small].min() == 1.0 and ch[1][~small].max() == 0.0 and ch[0].any()


def test_cache_refuses_another_source_and_names_missing_priors(tmp_path):
    cache = PriorCache(tmp_path)
    cache.build("d", [], None, {"source": "classic", "description": "x"}, False)
    with pytest.raises(ValueError, match="holds 'classic' priors"):
        cache.build("d", [], None, {"source": "sam", "description": "y"}, False)
    with pytest.raises(FileNotFoundError, match="python -m training.priors"):
        cache.load("d", "nothing")


@needs_data
def test_cli_classic_source_and_sam_without_checkpoint(tmp_path):
    data = tmp_path / "msrs"
    for sub, ext in (("ir", ".png"), ("vi", ".png"), ("boxes", ".txt")):
        (data / sub).mkdir(parents=True)
        for s in sorted(p.stem for p in (MSRS / "ir").iterdir())[:2]:
            (data / sub / (s + ext)).symlink_to(MSRS / sub / (s + ext))
    assert main(["--out", str(tmp_path / "c"), "--data", str(data), "--source", "classic"]) == 0
    assert len(list((tmp_path / "c" / "msrs").glob("*.npz"))) == 2
    assert "watershed" in PriorCache(tmp_path / "c").meta()["description"]
    with pytest.raises(SystemExit, match="--sam-checkpoint"):
        main(["--out", str(tmp_path / "s"), "--data", str(data), "--source", "sam"])


def link_pairs(folder, stems):
    for sub, ext in (("ir", ".png"), ("vi", ".png"), ("boxes", ".txt")):
        (folder / sub).mkdir(parents=True)
        for s in stems:
            (folder / sub / (s + ext)).symlink_to(MSRS / sub / (s + ext))
    return folder


@needs_mfnet
def test_mfnet_prior_cache_round_trip_on_shared_pairs(tmp_path):
    stems = ["00008N", "00537D"]  # a night and a day pair with MFNet reference maps
    data = link_pairs(tmp_path / "msrs", stems)
    out = tmp_path / "mfnet"
    assert main(["--out", str(out), "--data", str(data), "--source", "mfnet"]) == 0
    assert len(list((out / "msrs").glob("*.npz"))) == 2
    cache = PriorCache(out)
    meta = cache.meta()
    assert meta["source"] == "mfnet" and meta["classes"] == MFNET_CLASSES
    assert meta["inputs"] == ["semantic", "embeddings"]
    assert (meta["feature_channels"], meta["feature_stride"]) == (64, 16)
    counts = json.loads((MFNET / "reference" / "reference.json").read_text())
    samples = {s.stem: s for s in load_pairs(data, "pairs")}
    for stem in stems:
        prior = cache.load("msrs", stem)
        reference = cv2.imread(str(MFNET / "reference" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert (prior.semantic == reference).mean() > 0.999  # all 9 classes, as MFNet's own reference maps
        assert np.abs(np.bincount(prior.semantic.ravel(), minlength=9) - counts[stem]["class_pixels"]).sum() < 300
        np.testing.assert_array_equal(prior.objects, mfnet_objects(prior.semantic))
        assert prior.objects.any() and set(np.unique(prior.objects)) <= {0, 1, 2, 3}
        # regions: class-agnostic, each inside one class, as many as the classes have components
        pairs = np.unique(np.stack([prior.regions.ravel(), prior.semantic.ravel()]), axis=1)
        assert prior.regions.min() >= 1 and len(np.unique(pairs[0])) == pairs.shape[1]
        assert pairs.shape[1] == sum(cv2.connectedComponents((prior.semantic == c).astype(np.uint8))[0] - 1
                                     for c in np.unique(prior.semantic))
        assert prior.features.dtype == np.float16 and prior.features.shape == (64, 30, 40) and prior.stride == 16
        assert np.isfinite(prior.features).all() and prior.features.std() > 0
    again = MfnetPriors()(samples[stems[0]])  # the cache holds exactly what MFNet gives
    first = cache.load("msrs", stems[0])
    for field in ("regions", "objects", "semantic", "features"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    assert cache.build("msrs", list(samples.values()), None, meta, progress=False) == 0  # never recomputed


def test_teacher_input_stacks_masks_one_hot_classes_and_repeated_embeddings():
    semantic = np.zeros((32, 48), np.uint8)
    semantic[4:12, 4:12] = MFNET_CLASSES.index("person")
    semantic[20:30, 30:46] = MFNET_CLASSES.index("car")
    features = np.arange(3 * 2 * 3, dtype=np.float16).reshape(3, 2, 3)  # stride 16
    prior = Prior(class_regions(semantic), mfnet_objects(semantic), semantic, features, 16)
    ir = vis = np.zeros((32, 48), np.uint8)
    window = (slice(8, 24), slice(10, 42))
    x = teacher_input(prior, window, ir[window], vis[window], ("semantic", "embeddings"))
    assert x.shape == (4 + SEMANTIC_CHANNELS + 3, 16, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x[4:13].sum(0), 1)  # one-hot classes
    np.testing.assert_array_equal(x[4 + MFNET_CLASSES.index("person")], semantic[window] == 2)
    np.testing.assert_array_equal(x[3], prior.objects[window] > 0)
    for y, xx in ((0, 0), (15, 31), (8, 6)):  # embedding of pixel (8 + y, 10 + xx) is its 16 px cell's
        np.testing.assert_array_equal(x[13:, y, xx], features[:, (8 + y) // 16, (10 + xx) // 16])
    assert teacher_input(prior, window, ir[window], vis[window]).shape == (4, 16, 32)


def test_class_regions_split_each_class_into_its_components():
    semantic = np.zeros((10, 10), np.uint8)
    semantic[1:3, 1:3] = semantic[6:9, 6:9] = 2  # two people
    semantic[1:3, 6:9] = 1  # one car
    regions = class_regions(semantic)
    assert len(np.unique(regions)) == 4  # background, two people, one car
    assert regions[1, 1] != regions[7, 7] and regions.min() >= 1
    np.testing.assert_array_equal(mfnet_objects(semantic)[[1, 7, 1, 0], [1, 7, 7, 0]], [1, 1, 3, 0])
