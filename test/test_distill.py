"""Distillation runs of a few steps (every teacher on real MFNet priors, SAGE on classic priors, text with real
MiniLM) and the ablation table."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ivf_ros.checkpoint import load_checkpoint
from ivf_ros.data import data_root
from ivf_ros.model import FusionStudent, window_row_coordinates
from training import ablation, priors
from training.datasets import load_pairs
from training.distill import DISTILL_TERMS, ConditionedCrops, distill, load_distill_config, semantic_contrast
from training.mfnet import teacher_dir
from training.priors import ClassicPriors, PriorCache
from training.teachers import load_teacher, read_teacher_metadata, save_teacher

torch.set_num_threads(1)
MSRS = data_root() / "msrs"
MFNET = teacher_dir() / "mfnet_rgbt_9class.safetensors"
needs_data = pytest.mark.skipif(not (MSRS.is_dir() and MFNET.is_file()),
                                reason=f"shared data or MFNet weights not found at {MSRS}, {MFNET} (set IVF_DATA)")


@pytest.fixture(scope="module")
def tiny_msrs(tmp_path_factory):
    """Four real MSRS pairs (links) in a folder named msrs, and their classic and mfnet prior caches."""
    root = tmp_path_factory.mktemp("data")
    stems = sorted(p.stem for p in (MSRS / "ir").iterdir())[:4]
    for sub, ext in (("ir", ".png"), ("vi", ".png"), ("boxes", ".txt")):
        (root / "msrs" / sub).mkdir(parents=True)
        for s in stems:
            if (MSRS / sub / (s + ext)).exists():
                (root / "msrs" / sub / (s + ext)).symlink_to(MSRS / sub / (s + ext))
    samples = load_pairs(root / "msrs")
    PriorCache(root / "priors").build("msrs", samples, ClassicPriors(),
                                      {"source": "classic", "description": "test priors"}, progress=False)
    assert priors.main(["--out", str(root / "mfnet"), "--data", str(root / "msrs"), "--source", "mfnet"]) == 0
    return root


TINY_HEAD = {"seg_width": 8, "seg_context": 8, "seg_rows": 1, "seg_chroma": 1}  # the shipped head's kind, narrow


def tiny_config(name: str, root, steps: int, cache: str = "mfnet") -> dict:
    cfg = load_distill_config(f"training/configs/distill_{name}.yaml")
    cfg.pop("init")  # a fresh student of the tiny width, not the trained one
    cfg["data"] = [{"root": str(root / "msrs"), "layout": "pairs"}]
    cfg["val"] = {"root": str(root / "msrs"), "layout": "pairs", "limit": 1}
    cfg["priors"] = str(root / cache)
    cfg["text"] = {"descriptions": str(root / f"descriptions_{cache}.json"),
                   "mfnet_priors": str(root / "mfnet") if cache == "mfnet" else None}
    cfg["teacher"].update(warmup=2, hyper_parameters={**cfg["teacher"]["hyper_parameters"], "width": 8})
    cfg["model"] = {"width": 8, **TINY_HEAD}
    cfg["train"].update(steps=steps, batch=2, crop=64, val_every=1000, threads=1, device="cpu")
    return cfg


@pytest.fixture(scope="module")
def sage_run(tiny_msrs):
    out = tiny_msrs / "sage"
    return out, distill(tiny_config("sage", tiny_msrs, 14), out, progress=False)


@pytest.fixture(scope="module")
def text_run(tiny_msrs):
    out = tiny_msrs / "text"
    return out, distill(tiny_config("text", tiny_msrs, 3), out, progress=False)


def assert_names_teacher_and_priors(out, teacher: str, source: str) -> dict:
    """The student checkpoints and the teacher file of a run name its teacher and prior source; returns the
    teacher metadata of the best student."""
    for name in ("best", "final"):
        _, meta = load_checkpoint(out / f"{name}.safetensors")
        assert meta["training"]["prior_source"] == source
        assert meta["training"]["teacher"]["name"] == teacher and meta["training"]["teacher"]["prior_source"] == source
    _, tmeta = load_teacher(out / "teacher.safetensors")
    assert tmeta["teacher"] == teacher and tmeta["prior_source"] == source
    return load_checkpoint(out / "best.safetensors")[1]["training"]["teacher"]


@needs_data
def test_sage_distillation_on_mfnet_priors_lowers_its_loss_and_writes_a_node_checkpoint(sage_run):
    out, result = sage_run
    losses = [h["distill"] for h in result["history"]]
    assert len(losses) == 14
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    student, meta = load_checkpoint(out / "best.safetensors")  # what the node loads
    assert isinstance(student, FusionStudent)
    teacher = assert_names_teacher_and_priors(out, "sage", "mfnet")
    assert teacher["condition_options"] == {"inputs": ["semantic", "embeddings"]}
    assert teacher["hyper_parameters"]["prior_channels"] == 13 and teacher["hyper_parameters"]["embedding_dim"] == 64
    assert teacher["prior_description"].startswith("MFNet RGB-thermal segmenter")
    _, final_meta = load_checkpoint(out / "final.safetensors")  # the student after the last step
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert final_meta["validation"]["step"] == 14 == log[-1]["step"]
    assert meta["validation"]["step"] == max(log, key=lambda r: r["score"])["step"]  # best: the top validation score
    _, tmeta = load_teacher(out / "teacher.safetensors")
    assert tmeta["conditioning"]["priors"].endswith("mfnet")


@needs_data
def test_sage_distillation_on_classic_priors_sees_regions_and_objects_only(tiny_msrs):
    out = tiny_msrs / "sage_classic"
    result = distill(tiny_config("sage", tiny_msrs, 2, cache="priors"), out, progress=False)
    assert len(result["history"]) == 2
    teacher = assert_names_teacher_and_priors(out, "sage", "classic")
    assert teacher["condition_options"] == {"inputs": []} and teacher["hyper_parameters"]["prior_channels"] == 4
    cfg = tiny_config("sage", tiny_msrs, 1, cache="priors")
    cfg["prior_inputs"] = ["semantic"]
    with pytest.raises(ValueError, match="offers none"):
        distill(cfg, tiny_msrs / "sage_classic_semantic", progress=False)


@needs_data
def test_text_distillation_uses_minilm_embeddings_of_descriptions_with_mfnet_objects(text_run, tiny_msrs):
    out, result = text_run
    assert len(result["history"]) == 3 and all(torch.isfinite(torch.tensor(h["distill"])) for h in result["history"])
    teacher = assert_names_teacher_and_priors(out, "text", "mfnet")
    assert "all-MiniLM-L6-v2" in teacher["prior_description"] and "MFNet sees" in teacher["prior_description"]
    table = json.loads((tiny_msrs / "descriptions_mfnet.json").read_text())
    assert len(table) == 4 and all(k.startswith("msrs/") for k in table)
    assert all("MFNet sees " in text for text in table.values())



@needs_data
def test_saved_teacher_continues_and_can_be_frozen(sage_run, tiny_msrs):
    saved = load_file(str(sage_run[0] / "teacher.safetensors"))
    cfg = tiny_config("sage", tiny_msrs, 2)
    cfg["teacher"].update(init=str(sage_run[0] / "teacher.safetensors"), warmup=0, steps_per_round=0)
    result = distill(cfg, tiny_msrs / "sage_frozen", progress=False)
    assert len(result["history"]) == 2 and all(h["teacher"] > 0 for h in result["history"])
    frozen = load_file(str(tiny_msrs / "sage_frozen" / "teacher.safetensors"))
    assert saved.keys() == frozen.keys() and all(torch.equal(saved[k], frozen[k]) for k in saved)
    _, meta = load_teacher(tiny_msrs / "sage_frozen" / "teacher.safetensors")
    assert meta["init"] == cfg["teacher"]["init"] and meta["steps_per_round"] == 0


@needs_data
def test_teacher_init_of_another_size_is_refused(sage_run, tiny_msrs):
    cfg = tiny_config("sage", tiny_msrs, 1)
    cfg["teacher"].update(init=str(sage_run[0] / "teacher.safetensors"),
                          hyper_parameters={**cfg["teacher"]["hyper_parameters"], "width": 16})
    with pytest.raises(ValueError, match="teacher.init is a sage teacher"):
        distill(cfg, tiny_msrs / "sage_wrong_init", progress=False)


@needs_data
def test_rerun_and_resume_log_every_step_once(tiny_msrs):
    out = tiny_msrs / "sage_twice"

    def logged_steps():
        return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]

    for _ in range(2):  # a fresh run into an old folder starts a new log
        distill(tiny_config("sage", tiny_msrs, 1), out, progress=False)
        assert logged_steps() == [0, 1]
    with open(out / "log.jsonl", "a") as f:  # a validation logged after the saved state, then an interruption
        f.write(json.dumps({"step": 2}) + "\n")
    distill(tiny_config("sage", tiny_msrs, 1), out, resume=True, progress=False)
    assert logged_steps() == [0, 1]

@pytest.fixture(scope="module")
def fusionsam_run(tiny_msrs):
    cfg = tiny_config("fusionsam", tiny_msrs, 3)
    cfg["teacher"]["hyper_parameters"].update(codes=32, grid=8, sam_dim=32, class_evidence=True)
    out = tiny_msrs / "fusionsam"
    return out, distill(cfg, out, progress=False)


@needs_data
def test_fusionsam_teacher_on_mfnet_priors_distils_with_logit_term(fusionsam_run, tiny_msrs):
    out, result = fusionsam_run
    assert len(result["history"]) == 3 and all(h["segment"] > 0 for h in result["history"])
    teacher = assert_names_teacher_and_priors(out, "fusionsam", "mfnet")
    assert teacher["hyper_parameters"]["prior_channels"] == 13  # prompts from MFNet's object-class masks
    assert teacher["hyper_parameters"]["class_evidence"]  # each prompt raises its own class


@needs_data
def test_teacher_file_saved_before_a_new_hyper_parameter_continues(fusionsam_run, tiny_msrs):
    out, _ = fusionsam_run
    teacher, meta = load_teacher(out / "teacher.safetensors")
    del teacher.hp["class_evidence"]  # a file written before class_evidence existed (it behaves as off)
    old = save_teacher(tiny_msrs / "old_fusionsam.safetensors", teacher, {k: v for k, v in meta.items()
                                                                          if k not in ("teacher", "hyper_parameters")})
    assert "class_evidence" not in read_teacher_metadata(old)["hyper_parameters"]
    cfg = tiny_config("fusionsam", tiny_msrs, 1)
    cfg["teacher"]["hyper_parameters"].update(codes=32, grid=8, sam_dim=32)
    cfg["teacher"].update(init=str(old), warmup=0, steps_per_round=0)
    assert len(distill(cfg, tiny_msrs / "fusionsam_old", progress=False)["history"]) == 1


@needs_data
def test_ablation_table_on_one_pair(sage_run, text_run, fusionsam_run, tiny_msrs):
    md = tiny_msrs / "ablation.md"
    models = [f"sage_distilled={sage_run[0] / 'best.safetensors'}", f"sage_teacher={sage_run[0] / 'teacher.safetensors'}",
              f"text_teacher={text_run[0] / 'teacher.safetensors'}",
              f"fusionsam_teacher={fusionsam_run[0] / 'teacher.safetensors'}"]
    args = ["--data", str(tiny_msrs / "msrs"), "--limit", "1", "--reps", "1", "--out", str(md)]
    assert ablation.main(sum((["--model", m] for m in models), []) + args) == 0
    text = md.read_text()
    assert "### msrs (1 pairs)" in text
    assert "Minus sage_distilled, 95% paired bootstrap interval" in text and "[95% interval]" in text
    assert "| sage_teacher | [" in text  # its paired differences from the first model, with its wins
    for row in ("| max | trivial fusion", "| sage_distilled | student distilled from sage teacher",
                "| sage_teacher | sage teacher", "| text_teacher | text teacher",
                "| fusionsam_teacher | fusionsam teacher"):
        assert row in text, text
    numbers = json.loads(md.with_suffix(".json").read_text())
    rows = numbers["results"]["msrs"]["rows"]
    assert "person_f1" in rows["sage_distilled"] and len(rows["sage_teacher"]["person_f1_minus_first"]) == 2
    assert set(rows["sage_teacher"]["minus_first"]) == {"VIF", "Qabf", "SSIM", "SCD", "mean_f"}
    assert "minus_first" not in rows["sage_distilled"]


def test_semantic_contrast_prefers_matching_features():
    torch.manual_seed(0)
    teacher = torch.randn(2, 16, 8, 8)
    matched = semantic_contrast(teacher + 0.05 * torch.randn_like(teacher), teacher, samples=32)
    unrelated = semantic_contrast(torch.randn_like(teacher), teacher, samples=32)
    assert matched < 0.5 < unrelated


def test_distilled_student_head_is_fed_its_chroma_and_frame_rows():
    torch.manual_seed(0)
    student = FusionStudent(width=8, **TINY_HEAD)
    ir, vis_y, chroma = torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64), torch.rand(2, 2, 64, 64)
    rows = torch.stack([window_row_coordinates(0, 480, (8, 8)), window_row_coordinates(416, 480, (8, 8))])
    fused, logits, _, feats = student.forward_with_head(ir, vis_y, chroma, rows)
    assert logits.shape == (2, 4, 64, 64) and feats.shape[-2:] == (16, 16)
    logits.square().mean().backward()
    assert student.seg_rows_conv.weight.grad.abs().sum() > 0 and student.seg_chroma_conv.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the same crops at another place in the frame, or grey: other labels
        top = student.forward_with_head(ir, vis_y, chroma, rows[:1].expand(2, -1, -1, -1))[1]
        grey = student.forward_with_head(ir, vis_y, torch.full_like(chroma, 0.5), rows)[1]
        assert not torch.allclose(top[1], logits[1]) and not torch.allclose(grey, logits)


@needs_data
def test_direct_run_has_no_teacher_and_the_crops_of_a_distilled_run(tiny_msrs, sage_run):
    cfg = tiny_config("sage", tiny_msrs, 2)
    cfg["distill"] = {k: 0.0 for k in DISTILL_TERMS}
    out = tiny_msrs / "direct"
    result = distill(cfg, out, progress=False)
    assert len(result["history"]) == 2 and not (out / "teacher.safetensors").exists()
    _, meta = load_checkpoint(out / "final.safetensors")
    assert meta["training"]["method"].startswith("direct") and "teacher" not in meta["training"]
    assert meta["training"]["prior_source"].startswith("none") and meta["hyper_parameters"]["seg_rows"] == 1
    samples = load_pairs(tiny_msrs / "msrs")
    keyed = [(f"msrs/{s.stem}", s) for s in samples]
    with_prior = ConditionedCrops(keyed, lambda key, s, window, flip: torch.ones(1), 64, 4)
    without = ConditionedCrops(keyed, None, 64, 4)
    for a, b in zip(with_prior[3], without[3]):  # the same crop, chroma, rows and target; no condition
        assert torch.equal(a, b) or (a.numel() == 1 and b.numel() == 0)


@needs_data
def test_teacher_only_run_writes_its_teacher(tiny_msrs):
    cfg = tiny_config("sage", tiny_msrs, 0)
    cfg["teacher"]["warmup"], cfg["train"]["val_every"] = 3, 2
    out = tiny_msrs / "teacher_only"
    assert distill(cfg, out, progress=False)["history"] == []
    _, meta = load_teacher(out / "teacher.safetensors")
    assert meta["teacher"] == "sage" and meta["prior_source"] == "mfnet"
    assert meta["loss"] == cfg["teacher"]["loss"] != cfg["loss"]  # the teacher's own base loss
