"""The `diffad` command line: help, clear errors with exit code 2, and a tiny run end to end."""

import json
import subprocess
import sys

import pytest
import torch
from diffad.models.checkpoint import load_model
from diffad.training.demo_data import make_category

from diffad.cli import main


def test_help_lists_the_verbs():
    out = subprocess.run([sys.executable, "-m", "diffad.cli", "--help"], capture_output=True, text=True, check=True)
    for verb in ("train", "evaluate", "presets", "export"):
        assert verb in out.stdout


def test_train_without_budget_is_a_clear_error(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "budget" in capsys.readouterr().err


def test_train_on_an_empty_folder_names_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert "empty" in capsys.readouterr().err


def test_bad_numbers_are_rejected_by_the_parser(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(tmp_path), "--out", str(tmp_path), "--max-steps", "0"])
    assert exit_info.value.code == 2


def test_evaluate_a_missing_run_names_it(tmp_path, capsys):
    data = make_category(tmp_path / "data", size=32, num_train=2, num_test_good=1, num_test_defect=1)
    assert main(["evaluate", str(tmp_path / "no_run"), str(data)]) == 2
    assert "no_run" in capsys.readouterr().err


def test_train_then_evaluate(tmp_path, capsys):
    data = make_category(tmp_path / "data", size=32, num_train=8, num_test_good=3, num_test_defect=1)
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "2",
                 "--batch-size", "2", "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), str(data), "--json", str(tmp_path / "eval.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert printed == written
    assert {"image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1_max"} <= written.keys()
    assert (run / "calibration.json").is_file()


def test_train_takes_the_anomaly_sources_asked_for(tmp_path, capsys):
    data = make_category(tmp_path / "data", size=32, num_train=4, num_test_good=1, num_test_defect=1)
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "1", "--batch-size", "2",
                 "--workers", "0", "--anomaly-sources", "smudge, self", "--perlin-scales", "0,3",
                 "--anomaly-regions", "one"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["synthesis"]["regions"] == "one"
    assert saved["train"]["synthesis"]["sources"] == ["smudge", "self"]
    assert (saved["train"]["synthesis"]["min_scale_log2"], saved["train"]["synthesis"]["max_scale_log2"]) == (0, 3)
    for bad, words in (("3,1", "MIN <= MAX"), ("2", "MIN,MAX")):
        assert main(["train", str(data), "--out", str(tmp_path / "bad"), "--max-steps", "1",
                     "--perlin-scales", bad]) == 2
        assert words in capsys.readouterr().err
    assert main(["train", str(data), "--out", str(tmp_path / "other"), "--max-steps", "1",
                 "--anomaly-sources", "self,stains"]) == 2
    assert "stains" in capsys.readouterr().err


def test_train_takes_the_segmentation_input_asked_for(tmp_path, capsys):
    data = make_category(tmp_path / "data", size=32, num_train=4, num_test_good=1, num_test_defect=1)
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "1", "--batch-size", "2",
                 "--workers", "0", "--segmentation-input", "difference"]) == 0
    assert json.loads((run / "config.json").read_text())["model"]["segmentation_input"] == "difference"
    model = load_model(run)
    assert model.config.segmentation_input == "difference"
    assert model.segmentation.encoder[0][0].in_channels == 1  # a grey category's one-channel difference
    assert main(["train", str(data), "--out", str(tmp_path / "deco"), "--method", "decodiff", "--max-steps", "1",
                 "--segmentation-input", "difference"]) == 2
    assert "no segmentation network" in capsys.readouterr().err
    assert not (tmp_path / "deco").exists()


def test_train_keeps_the_map_smoothing_asked_for(tmp_path, capsys):
    data = make_category(tmp_path / "data", size=32, num_train=8, num_test_good=1, num_test_defect=1)
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "2", "--batch-size", "2",
                 "--workers", "0", "--map-sigma", "2.5"]) == 0
    assert load_model(run).config.map_sigma == 2.5
    assert json.loads((run / "config.json").read_text())["train"]["map_sigma_candidates"] == [2.5]
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(data), "--out", str(tmp_path / "bad"), "--max-steps", "1", "--map-sigma", bad])
        assert exit_info.value.code == 2 and "--map-sigma" in capsys.readouterr().err
    assert main(["train", str(data), "--out", str(tmp_path / "deco"), "--method", "decodiff", "--max-steps", "1",
                 "--map-sigma", "2"]) == 2
    assert "DiffusionAD's" in capsys.readouterr().err and not (tmp_path / "deco").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_train_on_a_missing_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--max-steps", "1", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
