"""Teachers (SAGE with Semantic Persistent Attention, text-guided with FiLM) and the text path with real MiniLM."""
import numpy as np
import pytest
import torch

from ivf_ros.data import data_root
from training.datasets import Sample, load_pairs
from training.mfnet import MFNET_CLASSES
from training.priors import PriorCache
from training.teachers import (OBJECT_CHANNELS, FiLM, FusionSamTeacher, SageTeacher, TextTeacher, load_teacher,
                               object_prompts, save_teacher)
from training.text_priors import describe, noise_sigma, seen_objects, shared_encoder, update_descriptions

torch.set_num_threads(1)
MSRS = data_root() / "msrs"


def _check_forward_backward(teacher, condition):
    ir, vis = torch.rand(2, 1, 64, 48), torch.rand(2, 1, 64, 48)
    fused, logits, feats = teacher(ir, vis, condition)
    assert fused.shape == (2, 1, 64, 48) and logits.shape == (2, 4, 64, 48)
    assert feats.shape == (2, teacher.feature_channels, 16, 12)
    (fused.mean() + logits.logsumexp(1).mean() + feats.pow(2).mean()).backward()
    no_grad = [n for n, p in teacher.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


def test_sage_teacher_forward_backward_and_prior_matters():
    torch.manual_seed(0)
    teacher = SageTeacher(width=8, heads=2, blocks=2, grid=4)
    _check_forward_backward(teacher, torch.rand(2, 4, 64, 48))
    teacher.eval()
    ir, vis = torch.rand(1, 1, 64, 48), torch.rand(1, 1, 64, 48)
    with torch.no_grad():
        a = teacher.features(ir, vis, torch.zeros(1, 4, 64, 48))
        b = teacher.features(ir, vis, torch.ones(1, 4, 64, 48))
    assert (a - b).abs().max() > 1e-3


def test_sage_teacher_reads_mfnet_class_masks_and_embeddings():
    torch.manual_seed(0)
    teacher = SageTeacher(width=8, heads=2, blocks=1, grid=4, prior_channels=13, embedding_dim=6)
    _check_forward_backward(teacher, torch.rand(2, 19, 64, 48))
    teacher.eval()
    ir, vis, prior = torch.rand(1, 1, 64, 48), torch.rand(1, 1, 64, 48), torch.rand(1, 19, 64, 48)
    other_masks, other_embeddings = prior.clone(), prior.clone()
    other_masks[:, 4:13] = torch.rand(1, 9, 64, 48)
    other_embeddings[:, 13:] = -4 * prior[:, 13:]
    with torch.no_grad():
        a = teacher.features(ir, vis, prior)
        assert (a - teacher.features(ir, vis, other_masks)).abs().max() > 1e-3  # the class masks matter
        assert (a - teacher.features(ir, vis, other_embeddings)).abs().max() > 1e-3  # so do the embeddings
    with pytest.raises(ValueError, match="has 4 channels, the teacher takes 13 \\+ 6"):
        teacher.features(ir, vis, prior[:, :4])


def test_object_prompts_are_components_of_each_class():
    masks = torch.zeros(1, 3, 40, 40)
    masks[0, 0, 5:15, 5:10] = 1  # a person touching a car: two prompts, not one
    masks[0, 2, 5:15, 10:30] = 1
    masks[0, 0, 30:34, 30:32] = 1  # a small second person
    boxes, points, channels = object_prompts(masks, max_prompts=8)[0]
    assert boxes.tolist() == [[10, 5, 30, 15], [5, 5, 10, 15], [30, 30, 32, 34]]  # largest first
    assert channels.tolist() == [2, 0, 0]
    assert points[0].tolist() == pytest.approx([19.5, 9.5])
    assert len(object_prompts(masks, max_prompts=2)[0][0]) == 2
    assert len(object_prompts(masks[:, :1].amax(1, keepdim=True) * 0, 8)[0][0]) == 0


def test_fusionsam_teacher_prompts_from_mfnet_object_classes_and_embeddings():
    torch.manual_seed(0)
    teacher = FusionSamTeacher(width=8, codes=32, grid=8, sam_dim=32, prior_channels=13, embedding_dim=4)
    assert OBJECT_CHANNELS == [4 + MFNET_CLASSES.index(c) for c in ("person", "bike", "car")]
    prior = torch.zeros(2, 17, 64, 48)
    prior[0, OBJECT_CHANNELS[0], 10:30, 5:20] = 1  # a person in the first image; nothing in the second
    prior[:, 13:] = torch.rand(2, 4, 64, 48)
    ir, vis = torch.rand(2, 1, 64, 48), torch.rand(2, 1, 64, 48)
    with torch.no_grad():
        plain = teacher.segment_with(teacher.features(ir, vis), (64, 48))
        _, prompted, _ = teacher(ir, vis, prior)
        moved = prior.clone()
        moved[0, OBJECT_CHANNELS[0]] = 0
        moved[0, OBJECT_CHANNELS[2], 40:60, 20:40] = 1  # a car elsewhere
        _, reprompted, _ = teacher(ir, vis, moved)
    assert torch.allclose(prompted[1], plain[1]) and not torch.allclose(prompted[0], plain[0])
    assert not torch.allclose(prompted[0], reprompted[0])  # the MFNet masks are the prompts
    with pytest.raises(ValueError, match="prior_channels 7"):
        FusionSamTeacher(width=8, prior_channels=7)


def test_fusionsam_class_evidence_raises_only_the_prompted_class():
    torch.manual_seed(0)
    kw = dict(width=8, codes=32, grid=8, sam_dim=32, prior_channels=13)
    agnostic, by_class = FusionSamTeacher(**kw), FusionSamTeacher(**kw, class_evidence=True)
    by_class.load_state_dict(agnostic.state_dict())  # the same weights: only where the evidence goes differs
    prior = torch.zeros(1, 13, 64, 48)
    prior[0, OBJECT_CHANNELS[2], 10:30, 5:20] = 1  # one MFNet car
    ir, vis = torch.rand(1, 1, 64, 48), torch.rand(1, 1, 64, 48)
    with torch.no_grad():
        plain = agnostic.segment_with(agnostic.features(ir, vis), (64, 48))
        raised_all = agnostic(ir, vis, prior)[1] - plain
        raised_car = by_class(ir, vis, prior)[1] - plain
    assert torch.allclose(raised_all[0, 1], raised_all[0, 3]) and raised_all[0, 1].max() > 0  # all alike
    assert raised_car[0, :3].abs().max() == 0 and torch.allclose(raised_car[0, 3], raised_all[0, 3])
    with pytest.raises(ValueError, match="class_evidence needs"):
        FusionSamTeacher(width=8, class_evidence=True)


def test_fusionsam_teacher_prompts_sam_decoder_and_trains():
    torch.manual_seed(0)
    teacher = FusionSamTeacher(width=8, codes=32, grid=8, sam_dim=32)
    prior = torch.zeros(2, 4, 64, 48)
    prior[0, 3, 10:30, 5:20] = 1  # two objects in the first image, none in the second
    prior[0, 3, 40:50, 30:40] = 1
    ir, vis = torch.rand(2, 1, 64, 48), torch.rand(2, 1, 64, 48)
    fused, logits, feats = teacher(ir, vis, prior)
    assert fused.shape == (2, 1, 64, 48) and logits.shape == (2, 4, 64, 48) and feats.shape[1:] == (32, 16, 12)
    (fused.mean() + logits.logsumexp(1).mean() + teacher.aux_loss).backward()
    unused = {"prompt_encoder.no_mask_embed.weight"}  # always a mask prompt (the fusion mask); IoU head unused
    no_grad = [n for n, p in teacher.named_parameters()
               if p.grad is None and n not in unused and "iou_prediction_head" not in n]
    assert not no_grad, no_grad
    assert teacher.mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0  # SAM's decoder is in the loop
    with torch.no_grad():  # without prompts the logits are the segmentation head's alone
        plain = teacher.segment_with(teacher.features(ir, vis), (64, 48))
        _, prompted, _ = teacher(ir, vis, prior)
    assert torch.allclose(prompted[1], plain[1]) and not torch.allclose(prompted[0], plain[0])


def test_fusionsam_teacher_loads_sam_decoder_weights(tmp_path):
    source = FusionSamTeacher(width=8, codes=32, grid=8, sam_dim=32)
    state = {f"{name}.{k}": v for name in ("prompt_encoder", "mask_decoder")
             for k, v in getattr(source, name).state_dict().items()}
    state["image_encoder.unused"] = torch.zeros(1)  # a SAM checkpoint also holds the image encoder
    torch.save(state, tmp_path / "sam.pth")
    loaded = FusionSamTeacher(width=8, codes=32, grid=8, sam_dim=32, sam_checkpoint=str(tmp_path / "sam.pth"))
    for name in ("prompt_encoder", "mask_decoder"):
        for k, v in getattr(source, name).state_dict().items():
            assert torch.equal(v, getattr(loaded, name).state_dict()[k])


def test_text_teacher_forward_backward():
    torch.manual_seed(0)
    _check_forward_backward(TextTeacher(width=8, text_dim=384), torch.randn(2, 384))


def test_film_starts_as_identity_and_modulates():
    film = FiLM(3, 2)
    x, t = torch.rand(1, 2, 4, 4), torch.rand(1, 3)
    assert torch.equal(film(x, t), x)
    with torch.no_grad():
        film.proj.bias.copy_(torch.tensor([1.0, 0.0, 0.5, 0.0]))  # gamma = (1, 0), beta = (0.5, 0)
    y = film(x, t)
    assert torch.allclose(y[:, 0], 2 * x[:, 0] + 0.5) and torch.allclose(y[:, 1], x[:, 1])


def test_teacher_file_round_trip(tmp_path):
    teacher = TextTeacher(width=8)
    path = save_teacher(tmp_path / "t.safetensors", teacher, {"conditioning": {"descriptions": "d.json"}})
    loaded, meta = load_teacher(path)
    assert meta["teacher"] == "text" and meta["hyper_parameters"]["width"] == 8
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_noise_estimate_recovers_gaussian_noise():
    rng = np.random.default_rng(0)
    smooth = np.tile(np.linspace(50, 200, 256), (256, 1))
    assert noise_sigma(smooth) < 0.5
    assert noise_sigma(smooth + rng.normal(0, 8, smooth.shape)) == pytest.approx(8, rel=0.15)


def test_descriptions_from_known_facts_keep_user_captions(tmp_path):
    dark = Sample("00042N", np.full((32, 32), 40, np.uint8), np.full((32, 32, 3), 10, np.uint8), None,
                  [(0, 1, 1, 5, 5), (0, 6, 6, 9, 9), (2, 10, 10, 20, 20)])
    text = describe(dark)
    assert "nighttime" in text and "very dark" in text and "2 persons, 1 car" in text
    path = tmp_path / "d.json"
    path.write_text('{"msrs/00042N": "a caption from a vision-language model"}')
    table = update_descriptions(path, {"msrs": [dark, Sample("00043D", dark.ir, dark.vis, None, [])]})
    assert table["msrs/00042N"] == "a caption from a vision-language model"
    assert "daytime" in table["msrs/00043D"] and "No person" in table["msrs/00043D"]


def test_descriptions_name_the_objects_mfnet_sees(tmp_path):
    semantic = np.zeros((60, 60), np.uint8)
    person, bike, car = (MFNET_CLASSES.index(c) for c in ("person", "bike", "car"))
    semantic[2:12, 2:8] = semantic[20:30, 2:8] = person  # two people of 60 px
    semantic[40:42, 40:42] = person  # 4 px: too small to count
    semantic[40:50, 10:30] = car
    assert seen_objects(semantic) == {"person": 2, "bicycle": 0, "car": 1}
    night = Sample("00042N", np.full((60, 60), 40, np.uint8), np.full((60, 60, 3), 10, np.uint8), None, None)
    text = describe(night, seen_objects(semantic))
    assert "nighttime" in text and text.endswith("MFNet sees 2 people and a car.")
    semantic[semantic == car] = bike
    assert describe(night, seen_objects(semantic)).endswith("MFNet sees 2 people and a bicycle.")
    assert describe(night, seen_objects(np.zeros_like(semantic))).endswith("MFNet sees no person, bicycle or car.")
    cache = PriorCache(tmp_path / "classic")
    cache.build("msrs", [], None, {"source": "classic", "description": "x"}, False)
    with pytest.raises(ValueError, match="need an mfnet cache"):
        update_descriptions(tmp_path / "d.json", {"msrs": [night]}, mfnet_priors=cache.root)


def test_text_path_with_real_minilm():
    encoder = shared_encoder()
    texts = ["A nighttime scene under very dark illumination. Objects: 2 persons.",
             "A night scene, very dark, with two people.",
             "A daytime scene under bright illumination. No person, bicycle or car is annotated."]
    emb = encoder.encode(texts)
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.1  # a real sentence model: paraphrases are closer than different scenes
    teacher = TextTeacher(width=8).eval()
    for film in teacher.modules():
        if isinstance(film, FiLM):
            torch.nn.init.normal_(film.proj.weight, std=0.5)
    ir, vis = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        a, b = teacher.features(ir, vis, emb[:1]), teacher.features(ir, vis, emb[2:])
    assert (a - b).abs().max() > 1e-3  # the description changes the teacher's features


@pytest.mark.skipif(not MSRS.is_dir(), reason=f"shared data not found at {MSRS} (set IVF_DATA)")
def test_descriptions_of_real_msrs_pairs():
    stems = sorted(p.stem for p in (MSRS / "ir").iterdir())
    picks = [next(s for s in stems if s.endswith("D")), next(s for s in stems if s.endswith("N"))]
    by_stem = {s.stem: s for s in load_pairs(MSRS, "pairs", stems=picks)}
    day, night = by_stem[picks[0]], by_stem[picks[1]]
    assert "daytime" in describe(day) and "nighttime" in describe(night)
    assert "Objects:" in describe(night) or "No person" in describe(night)
