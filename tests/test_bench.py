"""`diffad bench speed` and `diffad bench quality` on a tiny model and a small generated category.

Iterations are kept low through the commands' own options (short timings, a small matrix product, a
few images), so the whole module takes seconds; the figures are checked for sense, not for speed. The
speed benchmark runs on the tiny bundle the service tests share (one ONNX export per test session).
"""

import importlib.util
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffad.benchmarks.quality import METRICS, markdown_table
from diffad.benchmarks.speed import ModelSource, descendants, markdown_tables, proc_memory, stratified
from diffad.evaluation.evaluate import pipeline, predict, reconstruction_method
from diffad.export import exporter
from diffad.models import checkpoint as ckpt
from diffad.models.d3ad import D3ADConfig
from diffad.models.decodiff import DeCoDiff
from diffad.models.presets import count_gmac
from diffad.training.data import TestSample as Sample
from diffad.training.data import read_image
from diffad.training.demo_data import make_category
from test_service import make_tiny_bundle
from tiny_models import perturbed_tiny_model

from diffad.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST_SPEED = ["--limit", "4", "--recon-batch", "8", "--ddim-steps", "2", "5", "--seconds", "0.05",
              "--matmul-size", "128", "--matmul-repeats", "2", "--service-requests", "3"]


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_category(tmp_path_factory.mktemp("data") / "weave", size=32, channels=1, num_train=8,
                         num_test_good=5, num_test_defect=2)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)  # 3 channels, 32 px; grey test images are read as RGB


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "weave"
    ckpt.save_model(run / ckpt.MODEL_FILE, perturbed_tiny_model(channels=1))
    return run


def render_results_module():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "bench" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- building blocks ---------------------------------------------------------------------------------
def test_pipeline_with_the_one_step_reconstruction_is_the_forward(run_dir):
    model = ckpt.load_model(run_dir)
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(images)
        for got in (pipeline(model, images), pipeline(model, images, model.reconstruct)):
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        ddim = pipeline(model, images, reconstruction_method(model, "ddim", 3))
    assert not torch.allclose(ddim[0], expected[0])  # another reconstruction, another map
    assert torch.equal(ddim[1], model.score(ddim[0]))  # scored by the same top-k rule
    maps, scores = predict(model, images.numpy().transpose(0, 2, 3, 1), batch_size=2, progress=False,
                           reconstruct=reconstruction_method(model, "ddim", 3))
    np.testing.assert_allclose(scores, ddim[1].numpy(), atol=1e-6)
    assert maps.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown reconstruction"):
        reconstruction_method(model, "ddpm")


def test_stratified_keeps_both_classes_and_spreads_over_defects():
    samples = ([Sample(Path(f"g{i}"), 0, "good", None) for i in range(30)]
               + [Sample(Path(f"{kind}{i}"), 1, kind, Path("m")) for kind in ("a", "b", "c") for i in range(10)])
    chosen = stratified(samples, 12)
    assert len(chosen) == 12 and len({s.path for s in chosen}) == 12
    assert sum(s.label for s in chosen) == 6  # the set's proportions: half defective
    assert {s.defect_type for s in chosen} == {"good", "a", "b", "c"}
    few = stratified(samples[:30] + samples[30:31], 5)  # one defective image in all: it is kept
    assert sum(s.label for s in few) == 1 and len(few) == 5
    assert stratified(samples, 0) == samples and stratified(samples, 500) == samples
    with pytest.raises(ValueError, match="at least 2"):
        stratified(samples, 1)


def test_proc_memory_and_descendants():
    mine = proc_memory(os.getpid())
    if mine is None:
        pytest.skip("no /proc here")
    assert mine["vm_hwm_mib"] >= mine["vm_rss_mib"] > 10  # a Python process with torch loaded
    # a child that starts a grandchild: both are found
    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 5
        while len(descendants(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        found = descendants(os.getpid())
        assert child.pid in found and len(found) >= 2
        assert proc_memory(child.pid)["vm_rss_mib"] > 0
    finally:
        for pid in descendants(child.pid):
            os.kill(pid, signal.SIGTERM)
        child.wait(timeout=10)


# --- bench speed -------------------------------------------------------------------------------------
def test_bench_speed_on_a_tiny_bundle(bundle_dir, category, tmp_path, capsys):
    out_file = tmp_path / "speed.json"
    assert main(["bench", "speed", str(bundle_dir), str(category), *FAST_SPEED, "--json", str(out_file)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out_file.read_text()) == result
    assert result["benchmark"] == "speed" and result["model"]["kind"] == "bundle"
    assert result["model"]["channels"] == 3 and result["model"]["preset"] == "tiny"
    assert result["command"].startswith("diffad bench speed ") and "--limit 4" in result["command"]
    data = result["data"]
    assert data["used"] == 4 and data["good"] == data["defective"] == 2 and data["test_images"] == 11

    # (a) reconstruction methods
    methods = {m["method"]: m for m in result["reconstruction"]["methods"]}
    # D3AD from a per-image level needs held-out good images, which a bundle does not name: left out
    assert list(methods) == ["one-step", "ddim-2", "ddim-5", "ancestral", "d3ad-fixed"]
    assert [m["unet_passes_per_image"] for m in methods.values()] == [2, 2, 5, 201, 10]
    for m in methods.values():
        assert m["seconds_per_image"] > 0
        for name in METRICS:
            assert 0.0 <= m[name] <= 1.0, (m["method"], name)
    assert methods["one-step"]["slowdown_vs_one_step"] == 1.0
    # 201 sequential UNet passes against 2 batched ones: far slower, whatever the machine's load
    assert methods["ancestral"]["seconds_per_image"] > 5 * methods["one-step"]["seconds_per_image"]
    assert methods["ancestral"]["slowdown_vs_one_step"] > methods["ddim-5"]["slowdown_vs_one_step"]

    # (b) ONNX Runtime against PyTorch: both backends at both batch sizes, computing the same thing
    rows = result["backends"]["results"]
    assert sorted((r["backend"], r["batch"]) for r in rows) == [
        ("onnxruntime-cpu", 1), ("onnxruntime-cpu", 8), ("torch-cpu-eager", 1), ("torch-cpu-eager", 8)]
    assert all(r["images_per_s"] > 0 and r["iterations"] >= 5 for r in rows)
    by = {(r["backend"], r["batch"]): r["images_per_s"] for r in rows}
    assert result["backends"]["onnxruntime_over_torch"]["8"] == pytest.approx(
        by["onnxruntime-cpu", 8] / by["torch-cpu-eager", 8], rel=1e-2)
    for diff in result["backends"]["max_abs_diff_onnxruntime_vs_torch"].values():
        assert diff["map"] < 1e-4 and diff["score"] < 1e-5

    # (c) achieved FLOP/s against the measured matrix product
    compute = result["compute"]
    gmac = count_gmac(ckpt.load_model(bundle_dir / "model.safetensors"))["pipeline"]
    assert compute["gmac_per_image"]["pipeline"] == pytest.approx(gmac, abs=1e-4)
    matmul = compute["matmul"]
    assert matmul["size"] == 128 and matmul["peak_gflops"] == max(matmul["numpy_gflops"], matmul["torch_gflops"]) > 0
    assert {r["backend"] for r in compute["backends"]} == {"onnxruntime-cpu", "torch-cpu-eager"}
    for r in compute["backends"]:
        assert r["batch"] == 8
        assert r["achieved_gflops"] == pytest.approx(2 * gmac * r["images_per_s"], rel=1e-2)
        assert r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / matmul["peak_gflops"], rel=1e-2)

    # (d) the service's memory, with every request answered
    service = result["service"]
    assert service["ok"] == service["requests"] == 3 and service["statuses"] == {"200": 3}
    assert service["backend"] == "onnxruntime-cpu"
    assert service["vm_hwm_mib"] >= service["vm_rss_mib"] > 20
    assert service["total_vm_hwm_mib"] >= service["vm_hwm_mib"]

    # the README's speed tables render from this record: every method, with its figures as measured
    tables = markdown_tables(result)
    for m in methods.values():
        assert f"| {m['method']} | {m['unet_passes_per_image']} | {m['seconds_per_image']:.4f} |" in tables
    assert "| one-step vs 10-step DDIM, speed | n/a |" in tables  # this run measured DDIM 2 and 5 only


def speed_record(ddim_10=4.0, ancestral=120.0, ort_over_torch=1.5, fraction=0.2, auroc_one_step=0.9):
    """A bench speed record with just the fields the README's tables read."""
    def method(name, passes, slowdown, auroc):
        return {"method": name, "unet_passes_per_image": passes, "seconds_per_image": 0.01 * slowdown,
                "slowdown_vs_one_step": slowdown, "image_auroc": auroc, "pixel_auroc": auroc}

    return {
        "model": {"name": "m", "preset": "small", "image_size": 128, "channels": 1},
        "data": {"used": 20, "test_images": 175, "data_dir": "/data/dagm_class1"},
        "machine": {"cpu": "AMD EPYC", "cpu_count": 2},
        "reconstruction": {"batch_size": 8, "methods": [
            method("one-step", 2, 1.0, auroc_one_step), method("ddim-10", 10, ddim_10, 0.85),
            method("ancestral", 201, ancestral, 0.8)]},
        "backends": {"onnxruntime_over_torch": {"1": 1.1, "8": ort_over_torch}},
        "compute": {"matmul": {"peak_gflops": 100.0}, "backends": [
            {"backend": "onnxruntime-cpu", "batch": 8, "achieved_gflops": 100.0 * fraction,
             "fraction_of_peak": fraction}]},
        "service": {"vm_hwm_mib": 300.0, "total_vm_hwm_mib": 310.0, "backend": "onnxruntime-cpu"},
    }


def test_speed_tables_give_each_target_its_verdict():
    load = {"concurrency": 16, "runs": [{"mode": "batching", "max_batch_size": 8, "throughput_img_s": 25.0}],
            "bare_backend": [{"batch": 8, "images_per_s": 28.0}, {"batch": 1, "images_per_s": 26.0}]}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in markdown_tables(speed_record(), load).splitlines()}
    assert rows["one-step vs 10-step DDIM, speed"].endswith("| 4.00x | >= 3x | met |")
    assert rows["one-step vs ancestral from t_s, speed"].endswith("| 120.00x | >= 50x | met |")
    assert rows["ONNX Runtime over PyTorch eager, batch 8"].endswith("| 1.50x | >= 1.3x | met |")
    assert rows["ONNX Runtime FLOP/s over the matrix-product peak, batch 8"].endswith(
        "| 20 % | >= 40 % | **not met** |")
    assert rows["service under load over the bare backend, batch 8, 16 clients"].endswith(
        "| 89 % | >= 90 % | **not met** |")  # 25 / 28
    assert rows["one-step image / pixel AUROC no worse than the iterative ones"].endswith("| met |")
    worse = markdown_tables(speed_record(ddim_10=2.5, auroc_one_step=0.82))
    assert "| 2.50x | >= 3x | **not met** |" in worse
    assert worse.splitlines()[-3].endswith("| **not met** |")  # one-step AUROC 0.82 < DDIM's 0.85
    assert "service under load" not in worse  # no load record, no row
    assert "service peak resident memory 310 MiB" in worse


def test_bench_speed_refuses_bad_options(run_dir, category, capsys):
    assert main(["bench", "speed", str(run_dir), str(category), "--limit", "1"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["bench", "speed", str(run_dir / "missing"), str(category)]) == 2
    assert "missing" in capsys.readouterr().err


def test_a_run_or_a_model_file_is_exported_to_a_temporary_bundle(run_dir, bundle_dir, monkeypatch):
    exported = []

    def fake_export(source, out_dir, options):  # the real export is tested in test_export.py
        exported.append((Path(source), options.name, sorted(p.name for p in Path(source).iterdir())))
        shutil.copytree(bundle_dir, out_dir)

    monkeypatch.setattr(exporter, "export_bundle", fake_export)
    for path, kind in ((run_dir, "run"), (run_dir / ckpt.MODEL_FILE, "model file")):
        source = ModelSource(path)
        try:
            assert source.kind == kind and source.model.config.in_channels == 1  # the given model, not the bundle's
            assert source.bundle.onnx_path.is_file() and source.bundle.path != bundle_dir
            temporary = source.bundle.path.parent
        finally:
            source.close()
        assert not temporary.exists()  # the temporary export is removed
    assert exported[0][:2] == (run_dir, "weave")
    assert exported[1][1] == "model" and exported[1][2] == [ckpt.MODEL_FILE]


# --- bench training ----------------------------------------------------------------------------------
def test_bench_training_times_both_layouts_on_the_training_batches(category, tmp_path, capsys):
    out_file = tmp_path / "training.json"
    args = ["bench", "training", str(category), "--preset", "tiny", "--batch-size", "2", "--steps", "2",
            "--warmup", "1", "--precision", "fp32", "--budget-minutes", "1", "--json", str(out_file)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out_file.read_text()) == result
    assert result["benchmark"] == "training" and result["command"].startswith("diffad bench training ")
    assert result["precision"] == "fp32" and result["image_size"] == 32 and result["channels"] == 1
    assert result["crop"] is None and result["samples_per_step"] == 2  # the tiny preset trains on whole images
    assert "cpu_flags" in result["machine"] and "native_bf16_cpu" in result["machine"]
    layouts = result["layouts"]
    assert sorted(layouts) == ["channels_last", "contiguous"]
    for figures in layouts.values():
        assert 0 < figures["seconds_per_step_min"] <= figures["seconds_per_step_median"] <= figures[
            "seconds_per_step_max"]
        # one minute over a step and a hundredth of a validation check
        per_step = figures["seconds_per_step_median"] + result["validation_check_seconds"] / 100
        assert abs(figures["steps_in_budget"] - 60 / per_step) <= 2  # the figures are rounded
    assert result["channels_last_speedup"] == pytest.approx(
        layouts["contiguous"]["seconds_per_step_median"] / layouts["channels_last"]["seconds_per_step_median"],
        rel=1e-2)
    assert main(["bench", "training", str(category), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


# --- bench quality -----------------------------------------------------------------------------------
QUALITY = ["--preset", "tiny", "--max-steps", "2", "--max-minutes", "5", "--batch-size", "4", "--workers", "0"]


def test_bench_quality_writes_records_the_readme_table_renders(category, tmp_path, capsys):
    out_dir, runs_dir = tmp_path / "results", tmp_path / "runs"
    args = ["bench", "quality", str(category), *QUALITY, "--out-dir", str(out_dir), "--runs-dir", str(runs_dir)]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    path = out_dir / "weave_tiny_seed0.json"  # one seed, 0, by default
    record = json.loads(path.read_text())
    assert printed["files"] == [str(path)] and printed["results"] == [record] and printed["skipped"] == []

    assert record["name"] == "weave_tiny_seed0" and record["dataset"] == "weave" and record["preset"] == "tiny"
    assert record["group"] == "weave_tiny" and record["seed"] == 0 and "setting" not in record
    assert set(record["metrics"]) == set(METRICS)
    assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    assert record["test_images"] == 11 and record["anomalous_test_images"] == 6
    training = record["training"]
    assert training["steps"] == 2 and training["image_size"] == 32 and training["in_channels"] == 1
    assert training["train_seconds"] > 0 and training["seconds_per_step"] > 0
    assert record["budget"]["max_minutes"] == 5 and record["budget"]["max_steps"] == 2
    assert "cores" in record["machine"] and record["machine_details"]["cpu_count"] == os.cpu_count()
    assert record["torch"] == torch.__version__ and record["onnxruntime"]
    assert record["command"].startswith("diffad bench quality ") and "--max-steps 2" in record["command"]
    assert record["date"]
    assert not list(out_dir.glob("*.tmp"))  # the atomic write left no temporary behind
    # the run is a real run: evaluated, calibrated, exportable
    run = runs_dir / "weave_tiny_seed0"
    assert (run / "model.safetensors").is_file() and (run / "calibration.json").is_file()
    assert json.loads((run / "eval.json").read_text())["image_auroc"] == record["metrics"]["image_auroc"]

    # the README generator renders it, with the figures as recorded
    table = render_results_module().table(out_dir)
    row = next(line for line in table.splitlines() if line.startswith("| `weave`"))
    assert row.startswith("| `weave` | tiny, 32 px | 1 | "
                          + " | ".join(f"{record['metrics'][k]:.3f}" for k in METRICS))
    assert "| 2 steps, " in row and "±" not in row and record["machine"] in table
    assert printed["table"] == markdown_table([record])
    assert printed["summary"]["weave_tiny"]["n"] == 1

    # --overwrite trains a finished run again
    assert main([*args, "--overwrite", "--max-steps", "3"]) == 0
    assert json.loads(path.read_text())["training"]["steps"] == 3

    # --d3ad: the same model also evaluated in D3AD's two modes, settings from its held-out good images
    assert main([*args, "--overwrite", "--d3ad"]) == 0
    d3ad = json.loads(path.read_text())["d3ad"]
    assert set(d3ad) == {"d3ad-fixed", "d3ad"}
    assert d3ad["d3ad-fixed"]["d3ad"]["mode"] == "fixed" and len(d3ad["d3ad"]["d3ad"]["bin_edges"]) == 11
    for mode in d3ad.values():
        assert set(METRICS) <= set(mode) and mode["inference_images_per_s"] > 0

    # another input size and a setting label make another group, named for them, next to the preset's own
    assert main([*args, "--image-size", "24", "--setting", "crop24", "--map-sigma", "1.5"]) == 0
    other = json.loads((out_dir / "weave_tiny_24px_crop24_seed0.json").read_text())
    assert other["training"]["image_size"] == 24 and "--image-size 24" in other["command"]
    assert other["training"]["map_sigma"] == other["budget"]["map_sigma"] == 1.5  # the smoothing asked for
    assert other["group"] == "weave_tiny_24px_crop24" and other["setting"] == "crop24"
    assert (runs_dir / "weave_tiny_24px_crop24_seed0" / "model.safetensors").is_file() and path.is_file()
    assert "| `weave` | tiny, 24 px, crop24 | 1 | " in render_results_module().table(out_dir)


def test_bench_quality_seeds_resume_and_summarize(category, tmp_path, capsys, caplog, monkeypatch):
    from diffad.training import trainer as training

    caplog.set_level(logging.INFO, logger="diffad.bench.quality")
    real_train, trained = training.train, []

    def counting_train(dataset, run_dir, *a, **kw):
        trained.append((Path(run_dir).name, kw["train_config"].seed))
        return real_train(dataset, run_dir, *a, **kw)

    monkeypatch.setattr(training, "train", counting_train)
    out_dir, runs_dir = tmp_path / "results", tmp_path / "runs"
    args = ["bench", "quality", str(category), *QUALITY, "--out-dir", str(out_dir), "--runs-dir", str(runs_dir)]
    assert main([*args, "--seeds", "0,1"]) == 0
    assert trained == [("weave_tiny_seed0", 0), ("weave_tiny_seed1", 1)]  # each run its own seed
    first = json.loads(capsys.readouterr().out)
    paths = [out_dir / "weave_tiny_seed0.json", out_dir / "weave_tiny_seed1.json"]
    records = [json.loads(p.read_text()) for p in paths]
    assert first["files"] == [str(p) for p in paths] and first["results"] == records
    assert [r["seed"] for r in records] == [0, 1] and {r["group"] for r in records} == {"weave_tiny"}
    summary = first["summary"]["weave_tiny"]
    assert summary["n"] == 2 and summary["seeds"] == [0, 1]
    for k in METRICS:
        values = [r["metrics"][k] for r in records]
        assert summary["metrics"][k] == {"mean": pytest.approx(statistics.fmean(values)),
                                         "std": pytest.approx(statistics.stdev(values)), "values": values}
    assert first["table"] == markdown_table(records) and "| `weave` | tiny, 32 px | 2 | " in first["table"]

    # a rerun skips both finished runs, trains nothing, and still reports both with the summary
    trained.clear()
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert main([*args, "--seeds", "0,1"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert trained == [] and [p.stat().st_mtime_ns for p in paths] == mtimes
    assert again["results"] == records and again["skipped"] == [str(p) for p in paths]
    assert again["summary"] == first["summary"] and again["table"] == first["table"]
    assert f"skipping, result exists: {paths[1]}" in caplog.text
    assert main([*args, "--seed", "1"]) == 0 and trained == []  # --seed S is --seeds S
    assert json.loads(capsys.readouterr().out)["results"] == records[1:]

    # a run folder without its result file is an interrupted run: trained again from scratch
    paths[1].unlink()
    (runs_dir / "weave_tiny_seed1" / "left_over").write_text("half a run")
    caplog.clear()
    assert main([*args, "--seeds", "0,1"]) == 0
    assert trained == [("weave_tiny_seed1", 1)] and paths[1].is_file()
    assert not (runs_dir / "weave_tiny_seed1" / "left_over").exists()
    assert "no result file (an interrupted run)" in caplog.text
    assert paths[0].stat().st_mtime_ns == mtimes[0]
    assert json.loads(capsys.readouterr().out)["summary"]["weave_tiny"]["n"] == 2

    # bad seed lists are refused before any training
    trained.clear()
    for bad in (["--seeds", "0,x"], ["--seeds", "1,1"], ["--seeds", "-1"], ["--seeds", "0", "--seed", "0"],
                ["--setting", "a/b"]):
        assert main([*args, *bad]) == 2, bad
    assert trained == []


def quality_result(dataset="weave", seed=None, auroc=0.5, steps=100, image_size=32, setting=None):
    record = {"name": f"{dataset}_tiny" + (f"_seed{seed}" if seed is not None else ""), "dataset": dataset,
              "preset": "tiny", "metrics": {k: auroc for k in METRICS},
              "training": {"steps": steps, "train_seconds": 60.0 * steps / 100, "image_size": image_size},
              "machine": "test machine"}
    if seed is not None:
        record.update(seed=seed, group=f"{dataset}_tiny" + (f"_{setting}" if setting else ""))
    if setting:
        record["setting"] = setting
    return record


def test_markdown_table_aggregates_seeds_and_renders_old_records():
    from diffad.benchmarks.quality import summarize

    old = json.loads((ROOT / "bench" / "results" / "previous_training" / "dagm_class1_small.json").read_text())
    assert "seed" not in old and "group" not in old
    seeds = [quality_result(seed=0, auroc=0.9, steps=100), quality_result(seed=1, auroc=0.8, steps=200)]
    ablation = quality_result(seed=0, auroc=0.7, setting="crop64")
    table = markdown_table([old, *seeds, ablation, quality_result(dataset="grid")])  # grid: old format too
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == 4
    m = old["metrics"]
    assert rows[0] == ("| `dagm_class1` | small, 128 px | 1 | " + " | ".join(f"{m[k]:.3f}" for k in METRICS)
                       + f" | {old['training']['steps']} steps, {old['training']['train_seconds'] / 60:.1f} min |")
    std = statistics.stdev([0.9, 0.8])  # the sample std, ddof=1
    assert rows[1] == ("| `weave` | tiny, 32 px | 2 | " + " | ".join([f"0.850 ± {std:.3f}"] * 5)
                       + " | 150 steps, 1.5 min (mean) |")
    assert rows[2].startswith("| `weave` | tiny, 32 px, crop64 | 1 | 0.700 | ") and "±" not in rows[2]
    assert rows[3].startswith("| `grid` | tiny, 32 px | 1 | 0.500 | ")
    assert table.endswith("Machine: AMD EPYC, 2 cores, no GPU; test machine")
    summary = summarize([old, *seeds, ablation])
    assert set(summary) == {"dagm_class1_small", "weave_tiny", "weave_tiny_crop64"}
    assert summary["weave_tiny"]["metrics"]["image_auroc"] == {"mean": pytest.approx(0.85),
                                                               "std": pytest.approx(std), "values": [0.9, 0.8]}
    assert summary["dagm_class1_small"]["n"] == 1 and summary["dagm_class1_small"]["metrics"]["pixel_ap"]["std"] is None


def test_markdown_table_can_show_the_validation_score_settings_are_chosen_by():
    seeds = [quality_result(seed=s, auroc=0.9) for s in (0, 1)]
    for record, score in zip(seeds, (0.6, 0.7), strict=True):
        record["training"]["validation"] = {"chosen": {"step": 100, "score": score}}
    old = quality_result(dataset="grid")  # no validation recorded: an empty cell
    table = markdown_table([*seeds, old], validation=True)
    assert table.splitlines()[0].startswith("| dataset | preset, input | seeds | validation | image AUROC |")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows[0].startswith(f"| `weave` | tiny, 32 px | 2 | 0.650 ± {statistics.stdev([0.6, 0.7]):.3f} | 0.900 ")
    assert rows[1].startswith("| `grid` | tiny, 32 px | 1 |  | 0.500 | ")
    assert "validation" not in markdown_table(seeds)  # the README's table leaves it out


def test_defect_type_table_aggregates_each_type_over_seeds():
    from diffad.benchmarks.quality import defect_type_table

    def with_types(seed, hole, uneven):
        record = quality_result(seed=seed)
        record["per_defect_type"] = {
            "hole": {"images": 4, "image_auroc": hole, "pixel_auroc": hole, "pixel_ap": 0.5, "defect_area": 0.002},
            "uneven": {"images": 9, "image_auroc": uneven, "pixel_auroc": uneven, "pixel_ap": 0.1,
                       "defect_area": 0.25}}
        return record

    assert defect_type_table([quality_result(seed=0)]) == ""  # records from before per-type figures
    table = defect_type_table([with_types(0, 1.0, 0.5), with_types(1, 0.9, 0.6), quality_result(dataset="grid")])
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    std = statistics.stdev([1.0, 0.9])
    assert rows == [
        f"| `weave` | tiny, 32 px | 2 | hole | 4 | 0.20 % | 0.950 ± {std:.3f} | 0.950 ± {std:.3f} | 0.500 ± 0.000 |",
        f"| `weave` | tiny, 32 px | 2 | uneven | 9 | 25.00 % | 0.550 ± {std:.3f} | 0.550 ± {std:.3f} | 0.100 ± 0.000 |",
    ]


def test_result_files_are_written_atomically(tmp_path, monkeypatch):
    from diffad.benchmarks import quality

    path = tmp_path / "weave_tiny_seed0.json"
    quality.write_atomically(path, "old\n")
    assert path.read_text() == "old\n"

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(quality.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quality.write_atomically(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_readme_table_skips_non_quality_results(tmp_path):
    (tmp_path / "speed.json").write_text(json.dumps({"benchmark": "speed", "machine": "x"}))
    table = render_results_module().table(tmp_path)
    assert table.count("\n") == 1  # the header only: no rows, no machine line


def test_histogram_quantile_reads_buckets_as_prometheus_does():
    from diffad.benchmarks.load import histogram_quantile

    buckets = {0.1: 10.0, 0.2: 30.0, 0.5: 38.0, float("inf"): 40.0}  # cumulative, as /metrics gives them
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)   # rank 20: halfway through (0.1, 0.2]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert histogram_quantile(0.375, buckets) == pytest.approx(0.125)  # rank 15: a quarter into (0.1, 0.2]
    assert histogram_quantile(0.99, buckets) == 0.5  # in +Inf: the highest finite bound, as Prometheus says
    assert histogram_quantile(0.95, {0.1: 0.0, float("inf"): 0.0}) is None


def test_throughput_measures_bf16_as_the_torch_backend_serves_it():
    """bf16 rows run the networks in bf16 on a copy (the served path, not autocast): their outputs differ a
    little from fp32, and the model the next rows use stays fp32."""
    from diffad.benchmarks import throughput
    from diffad.models.diffusionad import DiffusionAD
    from diffad.models.presets import preset

    model = DiffusionAD(preset("tiny"))
    graph = throughput.served_graph(model, "bf16", "cpu")
    assert next(graph.model.unet.parameters()).dtype == torch.bfloat16
    assert next(model.unet.parameters()).dtype == torch.float32, "the original model is left in fp32"
    result = throughput.bench_torch(["tiny"], [1], "cpu", ["fp32", "bf16", "fp16"], seconds=0.05, cuda_graphs=False)
    rows = {row["precision"]: row for row in result["results"]}
    assert set(rows) == {"fp32", "bf16"}, "fp16 and tf32 are GPU formats: skipped on the CPU"
    assert 0 < rows["bf16"]["max_map_diff_vs_fp32"] < 0.05
    assert rows["bf16"]["images_per_s"] > 0


def test_precision_benchmark_compares_bf16_with_fp32_on_a_test_set(run_dir, category, tmp_path, capsys):
    out = tmp_path / "precision.json"
    assert main_precision([str(run_dir), str(category), "--precision", "bf16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    test_files = [f for f in (category / "test").rglob("*.png")]
    assert result["num_test_images"] == len(test_files)
    assert result["num_anomalous"] == len([f for f in test_files if f.parent.name != "good"]) > 0
    assert 0 < result["map_max_abs_diff"] < 0.05, "bf16 networks move the map a little, not at all or a lot"
    assert result["score_max_abs_diff"] < 0.05 and -1 <= result["score_spearman"] <= 1
    assert set(result["metrics"]) == {"fp32", "bf16"}
    assert set(result["metrics"]["fp32"]) == {"image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap", "image_f1_max"}
    assert {"cpu", "cpu_flags", "native_bf16_cpu", "torch"} <= set(result["machine"]), "the CPU goes with the figures"
    assert main_precision([str(run_dir), str(category), "--precision", "fp16"]) == 2
    assert "fp16 is a GPU format" in capsys.readouterr().err


def main_precision(argv):
    from diffad.benchmarks import precision

    return precision.main(argv)


def test_bench_speed_compares_d3ad_levels_on_a_run_with_held_out_images(category, tmp_path, capsys):
    """The D3AD rows on a run: the per-image level's bins come from the run's held-out good images (never
    the test set), and the one-step row is the model's one-step forward."""
    run = tmp_path / "run"
    model = perturbed_tiny_model(channels=1)
    model.set_d3ad(D3ADConfig(steps=3))  # 3 guided DDIM steps (the paper's 10 take 3x longer to export)
    ckpt.save_model(run / ckpt.MODEL_FILE, model)
    held_out = sorted((category / "train" / "good").glob("*.png"))[:4]
    (run / ckpt.CONFIG_FILE).write_text(json.dumps({"held_out_images": [str(p) for p in held_out]}))
    argv = ["bench", "speed", str(run), str(category), *FAST_SPEED, "--methods", "one-step,d3ad-fixed,d3ad",
            "--no-service"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    methods = {m["method"]: m for m in result["reconstruction"]["methods"]}
    assert list(methods) == ["one-step", "d3ad-fixed", "d3ad"]
    assert [m["unet_passes_per_image"] for m in methods.values()] == [2, 3, 5]
    settings = result["reconstruction"]["d3ad"]
    assert settings["d3ad-fixed"]["mode"] == "fixed" and settings["d3ad"]["mode"] == "dynamic"
    assert len(settings["d3ad"]["bin_edges"]) == 11
    model = ckpt.load_model(run)
    with torch.no_grad():
        _, good_scores = model(torch.from_numpy(np.stack([read_image(p, 32, 1) for p in held_out])).permute(0, 3, 1, 2))
    assert settings["d3ad"]["bin_edges"][0] == pytest.approx(float(good_scores.min()), abs=1e-5)
    assert settings["d3ad"]["bin_edges"][-1] == pytest.approx(float(good_scores.max()), abs=1e-5)
    assert all(m["seconds_per_image"] > 0 for m in methods.values())  # timed, not compared: the machine is shared
    assert main(["bench", "speed", str(run), str(category), "--methods", "ddim,d3ad-fixed", "--no-service",
                 *FAST_SPEED]) == 2
    assert "must include one-step" in capsys.readouterr().err


def test_bench_speed_times_a_decodiff_graph_against_a_diffusionad_one(bundle_dir, category, tmp_path, capsys):
    from diffad.models.decodiff import DeCoDiff
    from diffad.models.presets import decodiff_preset

    run = tmp_path / "decodiff_run"
    model = DeCoDiff(decodiff_preset("tiny", ("weave",), 32, 3))
    with torch.no_grad():  # the zero-initialised last layer would make every map zero
        for p in model.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    ckpt.save_model(run / ckpt.MODEL_FILE, model)
    assert main(["bench", "speed", str(run), str(category), *FAST_SPEED, "--batch", "1", "2",
                 "--against", str(bundle_dir), "--no-service"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"]["method"] == "decodiff" and result["model"]["category"] == "weave"
    [row] = result["reconstruction"]["methods"]
    assert row["method"] == "decodiff" and row["unet_passes_per_image"] == 5 and row["seconds_per_image"] > 0
    against = result["backends"]["against"]
    assert against["method"] == "diffusionad" and [r["batch"] for r in against["results"]] == [1, 2]
    assert set(against["this_over_against_images_per_s"]) == {"1", "2"}
    assert row["score_mean_good"] > 0, "a perturbed model maps something"
    # the timed graph is the model's
    assert all(d["map"] < 1e-4 for d in result["backends"]["max_abs_diff_onnxruntime_vs_torch"].values())
    assert result["compute"]["gmac_per_image"]["pipeline"] == pytest.approx(
        5 * result["compute"]["gmac_per_image"]["unet_pass"], rel=1e-3)


def test_bench_quality_trains_decodiff_per_category_into_a_row_of_its_own(category, tmp_path, capsys):
    out_dir, runs_dir = tmp_path / "results", tmp_path / "runs"
    args = ["bench", "quality", str(category), *QUALITY, "--out-dir", str(out_dir), "--runs-dir", str(runs_dir),
            "--method", "decodiff"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    path = out_dir / "weave_decodiff_tiny_seed0.json"
    record = json.loads(path.read_text())
    assert printed["files"] == [str(path)] and record["method"] == "decodiff"
    assert record["group"] == "weave_decodiff_tiny" and "--method decodiff" in record["command"]
    assert set(record["metrics"]) == set(METRICS) and record["training"]["steps"] == 2
    assert isinstance(ckpt.load_model(runs_dir / "weave_decodiff_tiny_seed0"), DeCoDiff)
    assert "| `weave` | tiny, 32 px, decodiff | 1 | " in render_results_module().table(out_dir)
    assert main([*args, "--d3ad"]) == 2
    assert "--d3ad" in capsys.readouterr().err


def test_bench_quality_multi_class_trains_one_decodiff_model_for_all_categories(category, tmp_path, capsys):
    """--multi-class: one model per seed for every DATASET (in colour, since one of them is), one record per
    category with the model's categories; a rerun skips it; a per-category run's options are refused."""
    colour = make_category(tmp_path / "data" / "knit", size=32, channels=3, num_train=8, num_test_good=5,
                           num_test_defect=2, seed=3)
    out_dir, runs_dir = tmp_path / "results", tmp_path / "runs"
    args = ["bench", "quality", str(category), str(colour), *QUALITY, "--out-dir", str(out_dir),
            "--runs-dir", str(runs_dir), "--method", "decodiff", "--multi-class"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    paths = [out_dir / f"{name}_decodiff_multiclass_tiny_seed0.json" for name in ("weave", "knit")]
    assert printed["files"] == [str(p) for p in paths] and printed["skipped"] == []
    records = [json.loads(p.read_text()) for p in paths]
    assert [r["dataset"] for r in records] == ["weave", "knit"]
    assert all(r["multi_class"] == ["weave", "knit"] and r["training"]["steps"] == 2 for r in records)
    assert records[0]["run_dir"] == records[1]["run_dir"], "one model for both"
    model = ckpt.load_model(records[0]["run_dir"])
    assert isinstance(model, DeCoDiff) and model.config.categories == ("weave", "knit")
    assert model.config.in_channels == 3, "the grey category is read in colour, as the colour one"
    assert {r["metrics"]["image_auroc"] for r in records} != {None}
    table = render_results_module().table(out_dir)
    assert "| `weave` | tiny, 32 px, decodiff, one model for 2 categories | 1 | " in table
    assert "| `knit` | tiny, 32 px, decodiff, one model for 2 categories | 1 | " in table

    assert main(args) == 0  # finished: skipped, records reused
    assert json.loads(capsys.readouterr().out)["skipped"] == [str(p) for p in paths]
    assert main([*args[:-1]]) == 0, "without --multi-class: per-category records of their own"
    assert all((out_dir / f"{name}_decodiff_tiny_seed0.json").is_file() for name in ("weave", "knit"))
    capsys.readouterr()
    assert main(["bench", "quality", str(category), *QUALITY, "--method", "decodiff", "--multi-class"]) == 2
    assert main(["bench", "quality", str(category), str(colour), *QUALITY, "--multi-class"]) == 2
    assert "--multi-class" in capsys.readouterr().err
