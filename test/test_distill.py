"""Distillation runs of a few steps (SAGE with cached priors, text with real MiniLM) and the ablation table."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ivf_ros.checkpoint import load_checkpoint
from ivf_ros.data import data_root
from ivf_ros.model import FusionStudent
from training import ablation
from training.datasets import load_pairs
from training.distill import distill, load_distill_config, semantic_contrast
from training.priors import ClassicPriors, PriorCache
from training.teachers import load_teacher

torch.set_num_threads(1)
MSRS = data_root() / "msrs"
needs_data = pytest.mark.skipif(not MSRS.is_dir(), reason=f"shared data not found at {MSRS} (set IVF_DATA)")


@pytest.fixture(scope="module")
def tiny_msrs(tmp_path_factory):
    """Four real MSRS pairs (links) in a folder named msrs, and their classic prior cache."""
    root = tmp_path_factory.mktemp("data")
    stems = sorted(p.stem for p in (MSRS / "ir").iterdir())[:4]
    for sub, ext in (("ir", ".png"), ("vi", ".png"), ("boxes", ".txt")):
        (root / "msrs" / sub).mkdir(parents=True)
        for s in stems:
            if (MSRS / sub / (s + ext)).exists():
                (root / "msrs" / sub / (s + ext)).symlink_to(MSRS / sub / (s + ext))
    PriorCache(root / "priors").build("msrs", load_pairs(root / "msrs"), ClassicPriors(),
                                      {"source": "classic", "description": "test priors"}, progress=False)
    return root


def tiny_config(name: str, root, steps: int) -> dict:
    cfg = load_distill_config(f"training/configs/distill_{name}.yaml")
    cfg.pop("init")  # a fresh student of the tiny width, not the trained one
    cfg["data"] = [{"root": str(root / "msrs"), "layout": "pairs"}]
    cfg["val"] = {"root": str(root / "msrs"), "layout": "pairs", "limit": 1}
    cfg["priors"] = str(root / "priors")
    cfg["text"] = {"descriptions": str(root / "descriptions.json")}
    cfg["teacher"].update(warmup=2, hyper_parameters={**cfg["teacher"]["hyper_parameters"], "width": 8})
    cfg["model"] = {"width": 8}
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


@needs_data
def test_sage_distillation_lowers_its_loss_and_writes_a_node_checkpoint(sage_run):
    out, result = sage_run
    losses = [h["distill"] for h in result["history"]]
    assert len(losses) == 14
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    student, meta = load_checkpoint(out / "best.safetensors")  # what the node loads
    assert isinstance(student, FusionStudent)
    assert meta["training"]["prior_source"] == "classic: test priors"
    _, final_meta = load_checkpoint(out / "final.safetensors")  # the student after the last step
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert final_meta["validation"]["step"] == 14 == log[-1]["step"]
    assert meta["validation"]["step"] == max(log, key=lambda r: r["score"])["step"]  # best: the top validation score
    assert meta["training"]["teacher"]["name"] == "sage"
    teacher, tmeta = load_teacher(out / "teacher.safetensors")
    assert tmeta["conditioning"]["priors"].endswith("priors") and tmeta["prior_source"].startswith("classic")


@needs_data
def test_text_distillation_uses_minilm_embeddings_of_written_descriptions(text_run, tiny_msrs):
    out, result = text_run
    assert len(result["history"]) == 3 and all(torch.isfinite(torch.tensor(h["distill"])) for h in result["history"])
    _, meta = load_checkpoint(out / "best.safetensors")
    assert meta["training"]["teacher"]["name"] == "text"
    assert "all-MiniLM-L6-v2" in meta["training"]["prior_source"]
    table = json.loads((tiny_msrs / "descriptions.json").read_text())
    assert len(table) == 4 and all(k.startswith("msrs/") for k in table)



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
    cfg["teacher"]["hyper_parameters"].update(codes=32, grid=8, sam_dim=32)
    out = tiny_msrs / "fusionsam"
    return out, distill(cfg, out, progress=False)


@needs_data
def test_fusionsam_teacher_distils_with_logit_term(fusionsam_run, tiny_msrs):
    _, result = fusionsam_run
    assert all(h["segment"] > 0 for h in result["history"])
    _, meta = load_checkpoint(tiny_msrs / "fusionsam" / "best.safetensors")
    assert meta["training"]["teacher"]["name"] == "fusionsam"
    assert load_teacher(tiny_msrs / "fusionsam" / "teacher.safetensors")[1]["teacher"] == "fusionsam"


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
    assert "Person F1 minus sage_distilled" in text and "[95% interval]" in text
    for row in ("| max | trivial fusion", "| sage_distilled | student distilled from sage teacher",
                "| sage_teacher | sage teacher", "| text_teacher | text teacher",
                "| fusionsam_teacher | fusionsam teacher"):
        assert row in text, text
    numbers = json.loads(md.with_suffix(".json").read_text())
    rows = numbers["results"]["msrs"]["rows"]
    assert "person_f1" in rows["sage_distilled"] and len(rows["sage_teacher"]["person_f1_minus_first"]) == 2


def test_semantic_contrast_prefers_matching_features():
    torch.manual_seed(0)
    teacher = torch.randn(2, 16, 8, 8)
    matched = semantic_contrast(teacher + 0.05 * torch.randn_like(teacher), teacher, samples=32)
    unrelated = semantic_contrast(torch.randn_like(teacher), teacher, samples=32)
    assert matched < 0.5 < unrelated
