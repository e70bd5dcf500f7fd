"""Checkpoints, resuming, and a tiny train + evaluate run on generated images."""

import json
import shutil

import numpy as np
import pytest
import torch

from diffad.models import checkpoint as ckpt
from diffad.models.demo_data import make_category
from diffad.models.diffusionad import DiffusionAD
from diffad.models.evaluation import evaluate_run, load_calibration
from diffad.models.presets import preset
from diffad.models.training import TrainConfig, budget_progress, focal_loss, lr_factor, make_optimizer, train

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1_max")


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_category(tmp_path_factory.mktemp("data") / "weave", size=48, num_train=24, num_test_good=6,
                         num_test_defect=2, num_validation=4)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(batch_size=4, unet_lr=2e-3, segmentation_lr=2e-3, workers=0, checkpoint_every=2, log_every=2)
    return TrainConfig(**{**values, **overrides})


def test_model_file_round_trip(tmp_path):
    model = DiffusionAD(preset("tiny", in_channels=1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt.save_model(tmp_path / "m.safetensors", model, {"step": 3})
    loaded = ckpt.load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)[1], loaded(x)[1])
    assert ckpt.read_metadata(tmp_path / "m.safetensors")["step"] == "3"
    # no pickles: the file is safetensors, readable without torch.load
    assert (tmp_path / "m.safetensors").read_bytes()[8:9] == b"{"


def test_missing_or_corrupted_checkpoint_names_the_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found.*nothing.safetensors"):
        ckpt.load_model(tmp_path / "nothing.safetensors")
    model = DiffusionAD(preset("tiny"))
    path = tmp_path / "model.safetensors"
    ckpt.save_model(path, model)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_model(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_model(tmp_path)  # a run folder resolves to its model file


def test_training_state_round_trip(tmp_path):
    model = DiffusionAD(preset("tiny"))
    optimizer = make_optimizer(model, TrainConfig())
    model(torch.rand(2, 3, 32, 32))[1].sum().backward()
    optimizer.step()
    ckpt.save_training_state(tmp_path / "s.safetensors", model, optimizer, step=5)

    model2 = DiffusionAD(preset("tiny"))
    optimizer2 = make_optimizer(model2, TrainConfig())
    assert ckpt.load_training_state(tmp_path / "s.safetensors", model2, optimizer2) == 5
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for key in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][key]), torch.as_tensor(s2["state"][i][key]))


def test_focal_loss_by_hand():
    # p = sigmoid(0) = 0.5 for target 1: (1 - 0.5)^4 * -log(0.5) = 0.0625 * 0.6931
    assert focal_loss(torch.zeros(1), torch.ones(1), 4.0).item() == pytest.approx(0.0625 * np.log(2), rel=1e-5)
    # confident and right costs almost nothing; confident and wrong costs a lot
    assert focal_loss(torch.tensor([8.0]), torch.ones(1), 4.0) < 1e-6
    assert focal_loss(torch.tensor([-8.0]), torch.ones(1), 4.0) > 7


def test_resume_continues_exactly(category, tmp_path):
    """A run extended with a larger step budget (constant learning rate: a cosine follows the budget)."""
    constant = {"lr_schedule": "constant"}
    straight = train(category, tmp_path / "straight", "tiny", train_config=tiny_config(max_steps=4, **constant),
                     progress=False)
    train(category, tmp_path / "resumed", "tiny", train_config=tiny_config(max_steps=2, **constant), progress=False)
    resumed = train(category, tmp_path / "resumed", "tiny", train_config=tiny_config(max_steps=4, **constant),
                    resume=True, progress=False)
    assert straight["steps"] == resumed["steps"] == 4 and resumed["steps_this_run"] == 2
    a = ckpt.load_model(tmp_path / "straight").state_dict()
    b = ckpt.load_model(tmp_path / "resumed").state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_interrupted_run_resumes_on_the_same_schedule(category, tmp_path):
    """Killed after its step-2 checkpoint and resumed with the same budget: the same weights as straight."""
    cfg = tiny_config(max_steps=4, warmup_steps=2)
    straight = tmp_path / "straight"
    train(category, straight, "tiny", train_config=cfg, progress=False)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight, interrupted)
    for path in (interrupted / ckpt.CHECKPOINT_DIR).glob("step_0000004*"):
        path.unlink()
    (interrupted / ckpt.MODEL_FILE).unlink()
    resumed = train(category, interrupted, "tiny", train_config=cfg, resume=True, progress=False)
    assert resumed["steps_this_run"] == 2
    a, b = ckpt.load_model(straight).state_dict(), ckpt.load_model(interrupted).state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_learning_rate_schedule():
    cosine = TrainConfig(warmup_steps=10, final_lr_fraction=0.05)
    assert lr_factor(cosine, 0, 0.0) == pytest.approx(0.1)            # warm-up: (step + 1) / 10
    assert lr_factor(cosine, 9, 0.0) == pytest.approx(1.0)
    assert lr_factor(cosine, 100, 0.5) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(cosine, 100, 1.0) == pytest.approx(0.05)
    assert lr_factor(cosine, 100, 3.0) == pytest.approx(0.05)         # past the budget: stays at the floor
    assert lr_factor(TrainConfig(lr_schedule="constant", warmup_steps=10), 100, 0.9) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(TrainConfig(lr_schedule="linear"), 0, 0.0)
    # steps or time, whichever is further along
    assert budget_progress(50, 100, 30.0, 600.0) == pytest.approx(0.5)
    assert budget_progress(10, 100, 300.0, 600.0) == pytest.approx(0.5)
    assert budget_progress(10, None, 60.0, float("inf")) == 0.0


def test_learning_rate_decays_over_a_run(category, tmp_path):
    train(category, tmp_path / "run", "tiny", train_config=tiny_config(max_steps=8, warmup_steps=2), progress=False)
    log_lines = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    factors = [json.loads(line)["lr_factor"] for line in log_lines]
    assert factors[0] > 0.9 and factors[-1] < 0.2 and factors == sorted(factors, reverse=True)


def test_resume_without_checkpoint_is_an_error(category, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="nothing to resume"):
        train(category, tmp_path / "empty", "tiny", train_config=tiny_config(max_steps=1), resume=True)


def test_train_requires_a_budget(category, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        train(category, tmp_path / "run", "tiny", train_config=tiny_config(), progress=False)


def test_tiny_train_and_evaluate(category, tmp_path):
    run = tmp_path / "run"
    summary = train(category, run, "tiny", train_config=tiny_config(max_steps=6), progress=False)
    assert summary["steps"] == 6 and summary["in_channels"] == 1  # grey images detected
    for name in ("config.json", "model.safetensors", "train_log.jsonl", "train_summary.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "checkpoints").glob("step_*.safetensors"))) == 2  # only the newest are kept
    log_lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log_lines] == [2, 4, 6]

    result = evaluate_run(run, category, tmp_path / "eval.json", progress=False)
    for name in METRICS:
        assert 0.0 <= result[name] <= 1.0, name
    assert json.loads((tmp_path / "eval.json").read_text())["image_auroc"] == result["image_auroc"]
    # validation/good exists, so the threshold is a quantile of good scores, and it is stored
    calibration = load_calibration(run)
    assert calibration.method.startswith("quantile")
    assert calibration.normalize(calibration.threshold) == pytest.approx(0.5)
    assert result["num_test_images"] == 6 + 3 * 2


def test_time_budget_stops_training(category, tmp_path):
    summary = train(category, tmp_path / "run", "tiny", train_config=tiny_config(max_minutes=0.02, max_steps=10_000),
                    progress=False)
    assert 0 < summary["steps"] < 10_000
    assert summary["train_seconds"] < 30
