"""Checkpoint format: round trip, metadata, and one-line errors for bad files."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from helpers import META, write_checkpoint
from ivf_ros.checkpoint import (CheckpointError, default_checkpoint, load_checkpoint, read_metadata, save_checkpoint,
                                 validate_checkpoint_file)
from ivf_ros.model import FusionStudent


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    model = FusionStudent(num_classes=2, width=8)
    torch.nn.init.normal_(model.coeff_head.weight)
    path = save_checkpoint(tmp_path / "m.safetensors", model, META)
    loaded, meta = load_checkpoint(path)
    assert meta["classes"] == ["background", "person"]
    assert meta["hyper_parameters"] == {"num_classes": 2, "width": 8}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert json.loads((tmp_path / "m.json").read_text())["architecture"] == meta["architecture"]
    assert not loaded.training


def test_shipped_checkpoint_loads_with_its_classes():
    meta = read_metadata(default_checkpoint())
    assert meta["classes"][:4] == ["background", "person", "bicycle", "car"]
    model, _ = load_checkpoint()
    assert model.num_classes == len(meta["classes"])


def _one_line(exc: CheckpointError) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in _one_line(err.value) and "no such" in str(err.value)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "bad.safetensors" in _one_line(err.value)


def test_truncated_file(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", FusionStudent(num_classes=2, width=8), META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "m.safetensors" in _one_line(err.value)


def test_file_without_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(path)


def test_weights_that_do_not_match_the_architecture(tmp_path):
    # claims another width than the stored tensors have
    path = write_checkpoint(tmp_path / "m.safetensors", {"hyper_parameters": {"num_classes": 2, "width": 16}})
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(path)


def test_unknown_architecture_and_inconsistent_palette(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"ivf_ros": json.dumps({**META, "architecture": "resnet",
                                                                                 "hyper_parameters": {}})})
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_checkpoint(path)
    save_file({"w": torch.zeros(1)}, str(path), metadata={"ivf_ros": json.dumps(
        {**META, "palette": [[0, 0, 0]], "architecture": "ivf_coeffnet", "hyper_parameters": {}})})
    with pytest.raises(CheckpointError, match="palette"):
        load_checkpoint(path)


def test_header_length_lies(tmp_path):
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError):
        read_metadata(path)


@pytest.mark.parametrize("change, reason", [
    (lambda t: torch.full_like(t, float("nan")), "NaN or infinite"),
    (lambda t: torch.full_like(t, float("inf")), "NaN or infinite"),
    (lambda t: t.to(torch.int32), "stored as I32"),
    (lambda t: t.to(torch.bool), "stored as BOOL"),
])
def test_weights_must_be_finite_floats(tmp_path, change, reason):
    path = write_checkpoint(tmp_path / "w.safetensors", tensor_change=change)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "w.safetensors" in _one_line(err.value) and reason in str(err.value)
    assert "coeff_head.weight" in str(err.value)


@pytest.mark.parametrize("changes, reason", [
    ({"hyper_parameters": {"num_classes": 2, "width": 100000}}, "width = 100000 is outside"),
    ({"hyper_parameters": {"num_classes": 100000000, "width": 8}}, "num_classes = 100000000 is outside"),
    ({"hyper_parameters": {"num_classes": 2, "width": 8.0}}, "width must be int"),
    ({"hyper_parameters": {"num_classes": 2, "width": True}}, "width must be int"),
    ({"hyper_parameters": {"num_classes": 2, "depth": 3}}, "no hyper-parameter 'depth'"),
    ({"hyper_parameters": [2, 8]}, "hyper_parameters must be an object"),
    ({"architecture": ["ivf_coeffnet"]}, "architecture must be a string"),
    ({"classes": 2}, "classes must be a non-empty list"),
    ({"classes": ["background", 7]}, "classes must be a non-empty list"),
    ({"classes": ["background", "person", "car"], "palette": [[0, 0, 0]] * 3}, "num_classes = 2"),
    ({"palette": [[0, 0, 0], [255, 0]]}, "palette colour 1"),
    ({"palette": [[0, 0, 0], [256, 0, 0]]}, "palette colour 1"),
    ({"palette": "red"}, "palette must be a list"),
])
def test_metadata_types_and_ranges_are_checked_before_building(tmp_path, changes, reason):
    path = write_checkpoint(tmp_path / "m.safetensors", changes)
    for check in (read_metadata, validate_checkpoint_file, load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            check(path)
        assert "m.safetensors" in _one_line(err.value) and reason in str(err.value)


def test_header_only_check_sees_shapes_and_dtypes_but_reads_no_weights(tmp_path):
    good = write_checkpoint(tmp_path / "good.safetensors")
    assert validate_checkpoint_file(good)["classes"] == META["classes"]
    nan = write_checkpoint(tmp_path / "nan.safetensors", tensor_change=lambda t: torch.full_like(t, float("nan")))
    assert validate_checkpoint_file(nan)["architecture"] == "ivf_coeffnet"  # values are only read by loading
    for change, reason in ((lambda t: t.to(torch.int32), "stored as I32"), (lambda t: t[:1], "shape")):
        with pytest.raises(CheckpointError, match=reason):
            validate_checkpoint_file(write_checkpoint(tmp_path / "w.safetensors", tensor_change=change))


def test_directory_and_device_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        validate_checkpoint_file(tmp_path)
    with pytest.raises(CheckpointError, match="not a regular file"):
        validate_checkpoint_file("/dev/zero")


def test_save_refuses_metadata_it_could_not_load(tmp_path):
    with pytest.raises(CheckpointError, match="palette colour 0"):
        save_checkpoint(tmp_path / "m.safetensors", FusionStudent(num_classes=1, width=8),
                        {"classes": ["a"], "palette": [[0, 0, 300]]})
