"""Semantic prior cache: the real segment-anything code path with a small random SAM, the classic source, the CLI."""
from functools import partial

import numpy as np
import pytest
import torch

from ivf_ros.data import data_root
from training.datasets import Sample, load_pairs
from training.priors import (ClassicPriors, PriorCache, SamPriors, load_sam, main, paint_regions, prior_channels)

torch.set_num_threads(1)
MSRS = data_root() / "msrs"
needs_data = pytest.mark.skipif(not MSRS.is_dir(), reason=f"shared data not found at {MSRS} (set IVF_DATA)")


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
    assert cache.source() == "sam: random tiny SAM"
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
    from training.priors import Prior

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
    assert "watershed" in PriorCache(tmp_path / "c").source()
    with pytest.raises(SystemExit, match="--sam-checkpoint"):
        main(["--out", str(tmp_path / "s"), "--data", str(data), "--source", "sam"])
