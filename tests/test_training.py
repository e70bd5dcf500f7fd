"""Checkpoints, resuming, and a tiny train + evaluate run on generated images."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffad.evaluation.evaluate import evaluate_run, load_calibration
from diffad.models import checkpoint as ckpt
from diffad.models.diffusionad import DiffusionAD
from diffad.models.presets import preset
from diffad.training.data import read_images
from diffad.training.demo_data import make_category
from diffad.training.trainer import TrainConfig, budget_progress, focal_loss, lr_factor, make_optimizer, train

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1_max")


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_category(tmp_path_factory.mktemp("data") / "weave", size=48, num_train=24, num_test_good=6,
                         num_test_defect=2, num_validation=4)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(batch_size=4, unet_lr=2e-3, segmentation_lr=2e-3, workers=0, checkpoint_every=2, log_every=2,
                  validate_every=2)
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
    assert summary["train_seconds"] >= 0.02 * 60  # it stopped because the clock ran out, not before


# --- precision, crops, averaging, BatchNorm, validation ------------------------------------------------
def test_precision_follows_the_capability_check(monkeypatch):
    from diffad.training import trainer as training

    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "native_bf16", lambda device: False)
    assert training.choose_precision("auto", cpu)[0] == "fp32"
    precision, why = training.choose_precision("bf16", cpu)
    assert precision == "bf16" and "emulates" in why  # forced, with the warning in the log line
    monkeypatch.setattr(training, "native_bf16", lambda device: True)
    assert training.choose_precision("auto", cpu) == ("bf16", "this CPU computes bf16 natively")
    assert training.choose_precision("fp32", cpu)[0] == "fp32"
    with pytest.raises(ValueError, match="precision"):
        training.choose_precision("fp16", cpu)


def test_native_bf16_needs_the_instructions_not_onednn_emulation(monkeypatch):
    """oneDNN says yes on any AVX512 CPU (it emulates bf16 there, 2.5-3x slower than fp32): the bf16
    instructions decide."""
    from diffad.training import trainer as training

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert training.native_bf16(cpu) is False
    assert training.choose_precision("auto", cpu)[0] == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # Sapphire Rapids and later
    assert training.native_bf16(cpu) is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # Cooper Lake, Zen 4
    assert training.native_bf16(cpu) is True


def test_cpu_flags_read_the_kernels_list(tmp_path):
    from diffad.hardware import BF16_CPU_FLAGS, cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(cpuinfo) & BF16_CPU_FLAGS == {"avx512_bf16"}
    assert cpu_flags(tmp_path / "absent") == set()


def test_training_log_and_summary_name_the_precision(category, tmp_path, monkeypatch):
    from diffad.training import trainer as training

    monkeypatch.setattr(training, "native_bf16", lambda device: False)
    summary = train(category, tmp_path / "run", "tiny", train_config=tiny_config(max_steps=2), progress=False)
    assert summary["precision"] == "fp32" and "no native bf16" in summary["precision_reason"]
    assert summary["memory_format"] == "channels_last"  # fp32: the faster layout
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["precision"] == "auto"  # what was asked: a resume elsewhere checks again
    assert saved["train"]["memory_format"] == "auto"


def test_memory_layout_follows_device_and_precision():
    from diffad.training.trainer import memory_format

    from diffad.hardware import convolution_layout

    assert convolution_layout("cpu", "fp32") == "channels_last"
    assert convolution_layout("cpu", "bf16") == "contiguous"  # measured slower channels-last there
    assert convolution_layout("cuda", "bf16") == convolution_layout("cuda", "fp16") == "channels_last"
    cpu = torch.device("cpu")
    assert memory_format("auto", cpu, "fp32") == torch.channels_last
    assert memory_format("auto", cpu, "bf16") == torch.contiguous_format
    assert memory_format("channels_last", cpu, "bf16") == torch.channels_last  # asked for
    assert memory_format("contiguous", cpu, "fp32") == torch.contiguous_format
    with pytest.raises(ValueError, match="memory_format"):
        memory_format("nhwc", cpu, "fp32")


def test_crops_cut_image_mask_and_foreground_together():
    from diffad.training.synthesis import AnomalySynthesizer, SynthesisConfig
    from diffad.training.trainer import SyntheticAnomalyDataset

    rng = np.random.default_rng(0)
    images = rng.random((3, 32, 32, 1)).astype(np.float32)
    foregrounds = np.zeros((3, 32, 32), bool)
    foregrounds[:, :, :16] = True  # anomalies may only land on the left half
    synth = AnomalySynthesizer(SynthesisConfig(probability=1.0, foreground="auto", sources=("self",)))
    dataset = SyntheticAnomalyDataset(images, foregrounds, synth, crop=16, crops=4)
    crops, masks, flags = dataset[(1, 123)]
    assert crops.shape == (4, 1, 16, 16) and masks.shape == (4, 1, 16, 16) and flags.shape == (4,)
    for crop, mask in zip(crops.numpy(), masks.numpy(), strict=True):
        # every crop is a window of image 1, and outside its mask it is untouched
        windows = np.lib.stride_tricks.sliding_window_view(images[1, :, :, 0], (16, 16))
        match = (np.abs(windows - crop[0]) * (1 - mask[0]) < 1e-6).all(axis=(2, 3))
        assert match.any()
        top, left = np.argwhere(match)[0]
        allowed = foregrounds[1, top:top + 16, left:left + 16]
        assert not (mask[0].astype(bool) & ~allowed).any()  # background-only crops stay good
    again = dataset[(1, 123)]
    assert torch.equal(again[0], crops)  # the item's seed fixes crops and anomalies
    with pytest.raises(ValueError, match="crop"):
        SyntheticAnomalyDataset(images, foregrounds, synth, crop=40)


def test_crop_training_runs_and_infers_on_the_whole_image(category, tmp_path):
    summary = train(category, tmp_path / "run", "tiny",
                    train_config=tiny_config(max_steps=2, crop=16, crops_per_image=3), progress=False)
    assert summary["crop"] == 16 and summary["images_seen"] == 2 * 4 * 3
    model = ckpt.load_model(tmp_path / "run")
    anomaly_map, _ = model(torch.rand(1, 1, 32, 32))
    assert anomaly_map.shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="multiple of"):
        train(category, tmp_path / "bad", "tiny", train_config=tiny_config(max_steps=1, crop=10), progress=False)


def test_ema_averages_parameters_and_copies_buffers():
    from diffad.training.trainer import EMA

    model = DiffusionAD(preset("tiny", in_channels=1))
    ema = EMA(model, decay=0.9)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.segmentation.encoder[0][1].running_mean.fill_(0.7)
    ema.update(model, step=1000)  # past the warm-up: decay 0.9
    for old, new, live in zip(before, ema.model.parameters(), model.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * live, atol=1e-6)
        assert not new.requires_grad
    assert torch.equal(ema.model.segmentation.encoder[0][1].running_mean,
                       model.segmentation.encoder[0][1].running_mean)
    ema.update(model, step=0)  # warm-up: decay (1 + 0) / 10 = 0.1, mostly the live weights
    first, live = next(ema.model.parameters()), next(model.parameters())
    assert torch.allclose(first, live, atol=0.2)


def test_batchnorm_reestimation_makes_eval_mode_match_the_good_images():
    from diffad.training.trainer import reestimate_batchnorm

    model = perturbed_model()
    images = np.random.default_rng(0).random((8, 32, 32, 1)).astype(np.float32)
    batch = torch.from_numpy(images.transpose(0, 3, 1, 2))
    reestimate_batchnorm(model, images, batch_size=8)  # one batch: the statistics are exactly that batch's
    assert all(not m.training for m in model.modules())
    with torch.no_grad():
        eval_map = model(batch)[0]
        for m in model.segmentation.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.train()
        train_map = model(batch)[0]
    # train mode uses the batch's own (biased) variance, eval the running (unbiased) one: nearly equal
    assert torch.allclose(eval_map, train_map, atol=2e-2)
    assert not torch.allclose(perturbed_model()(batch)[0], eval_map, atol=2e-2)  # it did change something


def perturbed_model() -> DiffusionAD:
    from tiny_models import perturbed_tiny_model

    return perturbed_tiny_model(channels=1)


def test_validation_set_is_fixed_and_labelled(category):
    from diffad.training.synthesis import SynthesisConfig
    from diffad.training.trainer import holdout_split, make_validation_set

    good = np.random.default_rng(1).random((5, 32, 32, 1)).astype(np.float32)
    a = make_validation_set(good, None, SynthesisConfig(foreground="none"), "test")
    b = make_validation_set(good, None, SynthesisConfig(foreground="none"), "test")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)  # same anomalies every run
    assert a.labels.tolist() == [0, 1] * 5
    assert (a.masks[a.labels == 0] == 0).all() and all(m.any() for m in a.masks[a.labels == 1])
    assert np.array_equal(a.images[0], good[0])  # the clean copy is the image itself
    split = holdout_split(400, 0.1)
    assert len(split) == 40 and np.array_equal(split, holdout_split(400, 0.1))
    assert len(holdout_split(2000, 0.1)) == 64 and len(holdout_split(40, 0.1)) == 4
    assert len(holdout_split(6, 0.1)) == 0 and len(holdout_split(400, 0.0)) == 0


def test_training_keeps_the_best_validated_model(category, tmp_path):
    run = tmp_path / "run"
    summary = train(category, run, "tiny", train_config=tiny_config(max_steps=6), progress=False)
    validation = summary["validation"]
    assert validation["source"].endswith("validation/good") and validation["images"] == 8
    scores = [v["score"] for v in validation["history"]]
    assert [v["step"] for v in validation["history"]] == [2, 4, 6]
    best = max(validation["history"], key=lambda v: v["score"])
    assert summary["chosen_step"] == best["step"] and validation["chosen"]["score"] == max(scores)
    assert summary["t_s"] == validation["t_s_selection"]["chosen"]
    model = ckpt.load_model(run)
    assert model.config.t_s == summary["t_s"]
    # the image score's rule, chosen last on the same set, and its reference fitted on good training maps
    rule = validation["score_rule"]
    assert summary["score"] == {"top_k": rule["chosen"]["top_k"], "map_reference": rule["chosen"]["score_reference"]}
    assert (model.config.top_k, model.config.score_reference) == (rule["chosen"]["top_k"],
                                                                   rule["chosen"]["score_reference"])
    assert len(rule["scores"]) == 2 * len({1, 10, 50, preset("tiny").top_k})
    assert model.map_reference.mean.min() > 0 and torch.all(model.map_reference.inverse_std <= 100)
    assert ckpt.read_metadata(run / ckpt.MODEL_FILE)["step"] == str(best["step"])
    log = [json.loads(line) for line in (run / "validation_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [2, 4, 6]


def test_standardization_is_measured_on_the_training_images(category, tmp_path):
    from diffad.training.data import find_train_images, read_images

    train(category, tmp_path / "run", "tiny", train_config=tiny_config(max_steps=1), progress=False)
    model = ckpt.load_model(tmp_path / "run")
    images = read_images(find_train_images(category), 32, 1)
    assert model.config.input_mean[0] == pytest.approx(images.mean(), abs=1e-4)
    assert model.config.input_std[0] == pytest.approx(images.std(), abs=1e-4)
    train(category, tmp_path / "plain", "tiny", train_config=tiny_config(max_steps=1, standardize=False),
          progress=False)
    assert ckpt.load_model(tmp_path / "plain").config.input_std == (0.5,)


def test_threshold_from_held_out_images_when_there_is_no_validation_folder(tmp_path):
    data = make_category(tmp_path / "data" / "weave", size=48, num_train=24, num_test_good=4, num_test_defect=2,
                         num_validation=0)
    summary = train(data, tmp_path / "run", "tiny", train_config=tiny_config(max_steps=2), progress=False)
    assert summary["num_train_images"] == 20 and summary["validation"]["source"].startswith("4 images held out")
    held = json.loads((tmp_path / "run" / "config.json").read_text())["held_out_images"]
    assert len(held) == 4 and not set(held) & {str(p) for p in summary.get("train_paths", [])}
    evaluate_run(tmp_path / "run", data, progress=False)
    calibration = load_calibration(tmp_path / "run")
    assert calibration.method.startswith("quantile") and calibration.num_images == 4  # no test labels used

    # the benchmarks rebuild the run's validation set as training built it: its held-out images and the
    # same fixed-seed anomalies every time
    from diffad.training.trainer import run_validation_set

    vset = run_validation_set(tmp_path / "run", data, 48, 3)
    good = vset.images[vset.labels == 0]
    assert len(good) == 4 and np.allclose(good, read_images([Path(p) for p in held], 48, 3))
    again = run_validation_set(tmp_path / "run", data, 48, 3)
    assert np.array_equal(again.images, vset.images) and np.array_equal(again.masks, vset.masks)
    assert vset.labels.sum() > 0 and vset.source == summary["validation"]["source"]


def test_crop_setting_defaults_by_preset():
    from diffad.training.trainer import CROPS, crop_setting

    assert crop_setting("small", None, None) == (*CROPS["small"], True)  # gives way to whole images on a part
    assert crop_setting("small", 0, None) == (None, 1, False)         # --crop 0: whole images
    assert crop_setting("small", 32, None) == (32, 1, False)          # asked for: kept on a part too
    assert crop_setting("small", None, 2) == (CROPS["small"][0], 2, False)
    assert crop_setting("tiny", None, None) == (None, 1, False)


def part_on_plain_background(root: Path, count: int = 16, size: int = 48) -> Path:
    """A category of good images of a textured disc on a dark, flat background (an object, not a texture)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    (root / "train" / "good").mkdir(parents=True)
    for i in range(count):
        centre = size / 2 + rng.uniform(-3, 3, 2)
        disc = np.hypot(yy - centre[0], xx - centre[1]) < size * 0.3
        image = np.where(disc, 0.6 + 0.2 * rng.random((size, size)), 0.1) + rng.normal(0, 0.005, (size, size))
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(root / "train" / "good" / f"{i:03d}.png")
    return root


def test_preset_crops_give_way_to_whole_images_on_a_part(category, tmp_path):
    from diffad.training.trainer import load_training_images, shows_a_part

    part = part_on_plain_background(tmp_path / "disc")
    _, _, foregrounds, _ = load_training_images(part, 48, None, "auto")
    assert shows_a_part(foregrounds)
    _, _, foregrounds, _ = load_training_images(category, 48, None, "auto")
    assert not shows_a_part(foregrounds) and not shows_a_part(None)

    default = tiny_config(max_steps=1, crop=16, crops_per_image=2, whole_images_for_objects=True)
    on_part = train(part, tmp_path / "part", "tiny", train_config=default, progress=False)
    assert (on_part["crop"], on_part["crops_per_image"]) == (None, 1)
    saved = json.loads((tmp_path / "part" / ckpt.CONFIG_FILE).read_text())["train"]
    assert (saved["crop"], saved["crops_per_image"]) == (None, 1)  # a resume goes on with whole images
    on_texture = train(category, tmp_path / "texture", "tiny", train_config=default, progress=False)
    assert (on_texture["crop"], on_texture["crops_per_image"]) == (16, 2)
    asked = tiny_config(max_steps=1, crop=16, crops_per_image=2)  # --crop given: the part is cropped too
    assert train(part, tmp_path / "asked", "tiny", train_config=asked, progress=False)["crop"] == 16


@pytest.mark.parametrize("defect, expected", [("one pixel", 0.0), ("large region", "smoothed")])
def test_map_smoothing_is_chosen_on_the_validation_set(monkeypatch, defect, expected):
    from diffad.training import trainer as training
    from diffad.training.trainer import ValidationSet, select_map_sigma

    n, size = 6, 32
    masks, raw = np.zeros((2 * n, size, size), np.float32), np.zeros((2 * n, size, size), np.float32)
    for i in range(n):
        good, bad = 2 * i, 2 * i + 1
        if defect == "one pixel":  # a one-pixel defect a blur would drown; good images have a dim 3x3 blob
            masks[bad, 10 + i, 12] = raw[bad, 10 + i, 12] = 1.0
            raw[good, 5 + i:8 + i, 20:23] = 0.45
        else:  # a large defect, and single-pixel speckle of 1.0 in every image that a blur removes
            masks[bad, 8:20, 8:20], raw[bad, 8:20, 8:20] = 1.0, 0.6
            raw[good, 3 + i, 25] = raw[bad, 28, 3 + i] = 1.0
    labels = np.tile([0, 1], n)
    vset = ValidationSet(np.zeros((2 * n, size, size, 1), np.float32), masks, labels, "test")
    monkeypatch.setattr(training, "predict", lambda model, images, *a, **k: (raw, None))
    model = perturbed_model()
    model.set_map_sigma(1.0)

    result = select_map_sigma(model, vset, (0.0, 0.5, 1.0, 2.0))
    assert set(result["scores"]) == {"0", "0.5", "1", "2"}
    if expected == "smoothed":
        assert result["chosen"] > 0 and result["scores"]["0"] < result["scores"][f"{result['chosen']:g}"]
    else:
        assert result["chosen"] == 0.0 and result["scores"]["0"] == 1.0
    assert model.config.map_sigma == result["chosen"]
    # the model now smooths with the chosen sigma: its map is the raw segmentation map smoothed so
    images = torch.rand(2, 1, size, size)
    smoothed, _ = model(images)
    model.set_map_sigma(0.0)
    unsmoothed, _ = model(images)
    if result["chosen"] > 0:
        from diffad.models.diffusionad import gaussian_kernel, smooth_map

        torch.testing.assert_close(smoothed, smooth_map(unsmoothed, gaussian_kernel(result["chosen"])))
    else:
        torch.testing.assert_close(smoothed, unsmoothed)


@pytest.mark.parametrize("validation_fraction", [0.1, 0.0])
def test_map_smoothing_given_by_the_user_is_kept_without_a_choice(tmp_path, validation_fraction):
    """--map-sigma: the model, its saved config and a new run's summary keep the user's sigma, validation
    set or not; a negative, NaN or infinite one is refused before any work."""
    part = part_on_plain_background(tmp_path / "disc")  # no validation/good: held-out train images validate
    cfg = tiny_config(max_steps=2, map_sigma_candidates=(3.5,), validation_fraction=validation_fraction)
    summary = train(part, tmp_path / "run", "tiny", train_config=cfg, progress=False)
    assert summary["map_sigma"] == 3.5 and ckpt.load_model(tmp_path / "run").config.map_sigma == 3.5
    if validation_fraction:
        assert summary["validation"]["map_sigma_selection"] is None  # nothing was chosen
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="map_sigma_candidates"):
            train(part, tmp_path / "bad", "tiny", train_config=tiny_config(max_steps=1, map_sigma_candidates=(bad,)),
                  progress=False)
        assert not (tmp_path / "bad" / ckpt.MODEL_FILE).exists()


@pytest.mark.parametrize("channels", [1, 3])
def test_a_training_step_is_the_same_in_channels_last_layout(channels):
    """Training runs its networks channels-last for speed: the loss and every gradient must be what the
    default layout gives (a layout-dependent op would change the model, not only its speed)."""
    from diffad.training.trainer import training_step
    from tiny_models import perturbed_tiny_model

    reference = perturbed_tiny_model(channels=channels)
    channels_last = DiffusionAD(reference.config)
    channels_last.load_state_dict(reference.state_dict())
    channels_last.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((4, channels, 32, 32), dtype=np.float32))
    masks = torch.from_numpy((rng.random((4, 1, 32, 32)) > 0.8).astype(np.float32))
    has_anomaly = torch.tensor([1.0, 0.0, 1.0, 0.0])
    cfg = tiny_config(precision="fp32")
    results = []
    for model, layout in ((reference, torch.contiguous_format), (channels_last, torch.channels_last)):
        model.train()
        out = training_step(model, images.contiguous(memory_format=layout), masks.contiguous(memory_format=layout),
                            has_anomaly, cfg, torch.Generator().manual_seed(1))
        out["loss"].backward()
        results.append((out, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    convolutions = [p for p in channels_last.parameters() if p.dim() == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    for key in ("loss", "noise", "focal", "smooth_l1"):
        assert torch.allclose(out_a[key], out_b[key], rtol=1e-4, atol=1e-6), key
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], rtol=1e-3, atol=1e-5), name
