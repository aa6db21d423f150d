"""training.graft: one checkpoint's head with another's fusion decoder, only when they share the encoder."""
import pytest
import torch

from ivf_ros.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ivf_ros.model import FusionStudent
from training.graft import graft
from training.train import ENCODER_MODULES

META = {"classes": ["background", "person"], "palette": [[0, 0, 0], [255, 0, 0]], "training": {"data": "test"}}


def _random(seed: int, **hp) -> FusionStudent:
    torch.manual_seed(seed)
    model = FusionStudent(num_classes=2, width=8, **hp)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def _save(path, model, **meta):
    return save_checkpoint(path, model, {**META, **meta})


def test_graft_fuses_as_the_donor_and_labels_as_the_head(tmp_path):
    head = _random(0, seg_width=8, seg_context=8)
    donor = _random(1, seg_width=8, seg_context=8)
    donor.load_state_dict({k: v for k, v in head.state_dict().items() if k.split(".")[0] in ENCODER_MODULES},
                          strict=False)
    model, meta = graft(_save(tmp_path / "head.safetensors", head),
                        _save(tmp_path / "fusion.safetensors", donor, training={"data": "donor"}))
    ir, vis = torch.rand(1, 1, 48, 64), torch.rand(1, 1, 48, 64)
    with torch.no_grad():
        fused, logits = model.eval()(ir, vis)
        assert torch.equal(fused, donor(ir, vis)[0])
        assert torch.equal(logits, head(ir, vis)[1])
        assert not torch.equal(fused, head(ir, vis)[0])  # the decoder did change
    assert meta["training"]["data"] == "test" and meta["training"]["fusion"]["training"] == {"data": "donor"}
    assert meta["training"]["fusion"]["modules"] == ["dec8", "dec4", "coeff_head"]


def test_graft_refuses_other_encoders_and_heads_on_decoder_features(tmp_path):
    head = _save(tmp_path / "head.safetensors", _random(0, seg_width=8, seg_context=8))
    other = _save(tmp_path / "other.safetensors", _random(1, seg_width=8, seg_context=8))
    with pytest.raises(CheckpointError, match="encoder differs"):
        graft(head, other)
    shared = _save(tmp_path / "shared.safetensors", _random(0))  # 1x1 head on the decoder's features
    with pytest.raises(CheckpointError, match="seg_context 0"):
        graft(shared, head)
    assert load_checkpoint(head)[1]["training"] == {"data": "test"}  # inputs untouched
