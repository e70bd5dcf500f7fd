"""Export: the one-step ONNX graph, its parity with PyTorch, the bundle and its checks, TensorRT.

A tiny model at 32 px with randomised weights (zero-initialised output layers would hide bugs) and
BatchNorm statistics away from (0, 1) (an export that normalised with batch statistics would differ),
saved as a run folder without training. The TensorRT engine itself is built only where a GPU and the
tensorrt package are present; everything around it is tested everywhere.
"""

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime

import numpy as np
import onnx
import pytest
import torch
from diffad.evaluation.evaluate import CALIBRATION_FILE, Calibration
from diffad.export import exporter
from diffad.export.bundle import (
    REQUIRED_FIELDS,
    SCHEMA_VERSION,
    BundleError,
    load_bundle,
    sha256_file,
)
from diffad.export.exporter import export_bundle
from diffad.export.onnx_export import EXAMPLE_BATCH, export_onnx
from diffad.export.parity import (
    ONNX_TOLERANCE,
    TENSORRT_TOLERANCES,
    as_graph_input,
    onnx_vs_torch,
    onnxruntime_runner,
    parity_images,
)
from diffad.export.tensorrt_engine import (
    EngineMismatchError,
    EngineOptions,
    EngineRunner,
    add_engine,
    check_engine_compatible,
    engine_filename,
    gpu_slug,
    load_engine,
    missing_for_tensorrt,
    select_engine,
    tensorrt_vs_onnx,
)
from diffad.models import checkpoint as ckpt
from onnx import numpy_helper
from tiny_models import perturbed_tiny_model

from diffad.cli import main

CALIBRATION = Calibration(threshold=0.42, method="f1", score_min=0.1, score_max=0.9, num_images=12)
TRAIN_SUMMARY = {"preset": "tiny", "steps": 3, "train_seconds": 1.5}
EVAL = {"image_auroc": 0.9, "pixel_auroc": 0.8}
TENSORRT_MISSING = missing_for_tensorrt()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "weave"
    ckpt.save_model(run / ckpt.MODEL_FILE, perturbed_tiny_model())
    (run / CALIBRATION_FILE).write_text(json.dumps(CALIBRATION.to_dict()))
    (run / "train_summary.json").write_text(json.dumps(TRAIN_SUMMARY))
    (run / "eval.json").write_text(json.dumps(EVAL))
    return run


@pytest.fixture(scope="module")
def model(run_dir):
    return ckpt.load_model(run_dir)


@pytest.fixture(scope="module")
def bundle_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "weave"
    export_bundle(run_dir, out)
    return out


@pytest.fixture(scope="module")
def float32_onnx(model, tmp_path_factory):
    """The float32-input variant, at another opset than the default."""
    path = tmp_path_factory.mktemp("onnx") / "float32.onnx"
    export_onnx(model, path, "float32", opset=19)
    return path


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path):
    return shutil.copytree(bundle_dir, tmp_path / "bundle")


# --- the graph -----------------------------------------------------------------------------------
def test_graph_has_the_bundle_interface_and_the_fixed_noise(bundle_dir, model):
    graph = onnx.load(str(bundle_dir / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert [i.name for i in graph.graph.input] == ["images"]
    tensor = graph.graph.input[0].type.tensor_type
    assert tensor.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 32, 32]  # symbolic batch axis
    assert [o.name for o in graph.graph.output] == ["anomaly_map", "score"]
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 18
    # portable: standard operators only (no ONNX Runtime fused ops that TensorRT could not parse)
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    # the fixed noise at t_s and t_l is stored in the graph, not drawn at run time
    stored = [numpy_helper.to_array(t).ravel() for t in graph.graph.initializer]
    for i in range(2):
        noise = model.noise[i].numpy().ravel()
        assert any(a.shape == noise.shape and np.array_equal(a, noise) for a in stored), f"noise[{i}] not stored"
    assert not any(n.op_type.startswith("Random") for n in graph.graph.node)


def test_onnx_matches_pytorch_at_batch_1_and_8(model, bundle_dir):
    report = onnx_vs_torch(model, bundle_dir / "model.onnx", "uint8", batch_sizes=(1, 8))
    print("tiny uint8 parity:", json.dumps({k: report[k] for k in ("batches", "batch_independence")}))
    assert report["passed"], report["failures"]
    assert set(report["batches"]) == {"1", "8"}
    for figures in report["batches"].values():
        assert figures["images"] == 8
        assert figures["map_max_abs_diff"] <= ONNX_TOLERANCE.map
        assert figures["score_max_abs_diff"] <= ONNX_TOLERANCE.score
    assert report["batch_independence"]["score_max_abs_diff"] <= ONNX_TOLERANCE.score


def test_float32_input_variant_matches_pytorch_and_the_uint8_graph(model, float32_onnx, bundle_dir):
    graph = onnx.load(str(float32_onnx))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 19
    report = onnx_vs_torch(model, float32_onnx, "float32", batch_sizes=(1, 8))
    print("tiny float32 parity:", json.dumps(report["batches"]))
    assert report["passed"], report["failures"]
    images = parity_images(32, 3, count=4, seed=3)
    float_maps, float_scores = onnxruntime_runner(float32_onnx)(as_graph_input(images, "float32"))
    uint8_maps, uint8_scores = onnxruntime_runner(bundle_dir / "model.onnx")(images)
    np.testing.assert_allclose(float_maps, uint8_maps, atol=1e-6)
    np.testing.assert_allclose(float_scores, uint8_scores, atol=1e-6)


def test_scores_do_not_depend_on_the_batch(bundle_dir):
    run = onnxruntime_runner(bundle_dir / "model.onnx")
    images = parity_images(32, 3, count=5, seed=1)
    batch_maps, batch_scores = run(images)
    for i in range(5):
        maps, scores = run(images[i:i + 1])
        np.testing.assert_allclose(scores, batch_scores[i:i + 1], atol=1e-6)
        np.testing.assert_allclose(maps, batch_maps[i:i + 1], atol=1e-6)
    assert np.array_equal(run(images)[1], batch_scores)  # and the same batch twice: the same scores


def test_dynamic_batch_axis(bundle_dir):
    run = onnxruntime_runner(bundle_dir / "model.onnx")
    for batch in {1, 3, EXAMPLE_BATCH + 5} - {EXAMPLE_BATCH}:
        maps, scores = run(parity_images(32, 3, count=batch))
        assert maps.shape == (batch, 1, 32, 32) and maps.dtype == np.float32
        assert scores.shape == (batch,) and scores.dtype == np.float32
        assert np.all((maps >= 0) & (maps <= 1))


def test_parity_check_catches_a_model_that_differs(model, bundle_dir):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.segmentation.head.bias.add_(0.05)
    report = onnx_vs_torch(other, bundle_dir / "model.onnx", "uint8", batch_sizes=(1, 8))
    assert not report["passed"]
    assert any("batch 8" in f for f in report["failures"])


# --- the bundle ----------------------------------------------------------------------------------
def test_bundle_json_has_every_field(bundle_dir, model):
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    assert set(REQUIRED_FIELDS) <= set(manifest)
    cfg = model.config
    assert manifest["schema_version"] == SCHEMA_VERSION == 1
    assert manifest["name"] == "weave" and manifest["preset"] == "tiny"
    datetime.fromisoformat(manifest["created_at"])
    assert manifest["diffad_version"]
    inp = manifest["input"]
    assert (inp["name"], inp["size"], inp["channels"], inp["dtype"], inp["layout"], inp["range"]) == \
        ("images", 32, 3, "uint8", "NCHW", [0, 255])
    assert set(manifest["outputs"]) == {"anomaly_map", "score"}
    assert (manifest["t_s"], manifest["t_l"], manifest["w"], manifest["noise_seed"], manifest["top_k"]) == \
        (cfg.t_s, cfg.t_l, cfg.w, cfg.noise_seed, cfg.top_k)
    assert manifest["map_sigma"] == cfg.map_sigma == 0.8
    # the score against the fixture's map reference: the graph carries it, and the bundle says so
    assert manifest["score"] == {"top_k": cfg.top_k, "map_reference": True}
    assert "z = (map - mean)" in manifest["outputs"]["score"]["meaning"]
    standardization = manifest["input_standardization"]
    assert (standardization["mean"], standardization["std"]) == ([0.45, 0.5, 0.55], [0.2, 0.25, 0.3])
    assert manifest["threshold"] == CALIBRATION.threshold
    norm = manifest["score_normalization"]
    assert (norm["method"], norm["score_min"], norm["score_max"]) == ("f1", 0.1, 0.9)
    assert "score_max - score_min" in norm["formula"]
    assert manifest["training"] == TRAIN_SUMMARY
    assert manifest["validation"] == EVAL
    assert manifest["onnx"]["opset"] == 18 and "BASIC" in manifest["onnx"]["optimization"]
    assert manifest["onnx"]["parity"]["passed"]
    assert manifest["engines"] == []
    assert manifest["onnx_fp16"]["file"] == "model.fp16.onnx" and manifest["onnx_fp16"]["network_dtype"] == "float16"
    assert manifest["onnx_fp16"]["parity"]["passed"]
    assert manifest["files"] == {name: sha256_file(bundle_dir / name)
                                 for name in ("model.fp16.onnx", "model.onnx", "model.safetensors")}


# --- the fp16 graph (what TensorRT 11 builds fp16 engines from) -----------------------------------------
def _tensor_types(path) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {t.name: t.type.tensor_type.elem_type for t in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def test_fp16_graph_runs_the_networks_in_fp16_and_the_rest_in_fp32(bundle_dir):
    path = load_bundle(bundle_dir).onnx_fp16_path
    assert path == bundle_dir / "model.fp16.onnx"
    graph, types = onnx.load(str(path)).graph, _tensor_types(path)
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8  # the same interface
    assert [o.type.tensor_type.elem_type for o in graph.output] == [fp32, fp32]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    network_weights = {n.input[1] for n in convs if n.input[1].startswith(("model.unet.", "model.segmentation."))}
    assert len(network_weights) >= 20 and {types[w] for w in network_weights} == {fp16}
    # the map's Gaussian smoothing stays fp32, like the score after it
    assert {types[n.input[1]] for n in convs if n.input[1] not in network_weights} == {fp32}
    # fp32 where fp16 would break: the cast of the uint8 input, the top-k score and the map's sigmoid
    (topk,) = [n for n in graph.node if n.op_type == "TopK"]
    assert types[topk.input[0]] == fp32
    first_cast = next(n for n in graph.node if n.op_type == "Cast" and n.input[0] == "images")
    assert types[first_cast.output[0]] == fp32
    sigmoid_inputs = {types[n.input[0]] for n in graph.node if n.op_type == "Sigmoid"}
    assert fp16 in sigmoid_inputs  # the networks' SiLU
    # the anomaly map's sigmoid takes the segmentation's logits cast back to fp32
    assert any(types[n.input[0]] == fp32 for n in graph.node if n.op_type == "Sigmoid")


def test_fp16_graph_matches_the_fp32_graph_within_the_fp16_bounds(bundle_dir):
    images = parity_images(32, 3, count=8)
    fp32 = onnxruntime_runner(bundle_dir / "model.onnx")(images)
    fp16 = onnxruntime_runner(bundle_dir / "model.fp16.onnx")(images)
    map_diff, score_diff = (float(np.abs(a - b).max()) for a, b in zip(fp32, fp16, strict=True))
    print(f"fp16 graph vs fp32 (ONNX Runtime CPU): maps {map_diff:.2e}, scores {score_diff:.2e}")
    assert map_diff <= TENSORRT_TOLERANCES["fp16"].map and score_diff <= TENSORRT_TOLERANCES["fp16"].score
    assert map_diff > 0, "bit-identical results: the fp16 graph's weights are not fp16"


def test_network_dtype_changes_only_the_networks(model):
    """In PyTorch (bf16 on the CPU): networks in bf16, outputs fp32 and close to the fp32 model's."""
    images = torch.from_numpy(parity_images(32, 3, count=4)).float() / 255
    reduced = copy.deepcopy(model).set_network_dtype(torch.bfloat16)
    assert reduced.network_dtype == torch.bfloat16 and model.network_dtype == torch.float32
    assert reduced.noise.dtype == torch.float32  # the fixed noise and the rest of the pipeline stay fp32
    with torch.inference_mode():
        (maps, scores), (ref_maps, ref_scores) = reduced(images), model(images)
    assert maps.dtype == scores.dtype == torch.float32
    assert 0 < float((maps - ref_maps).abs().max()) < 0.05
    assert float((scores - ref_scores).abs().max()) < 0.02


def test_cli_export_without_the_fp16_graph(run_dir, tmp_path):
    assert main(["export", str(run_dir), "--out", str(tmp_path / "b"), "--no-fp16-graph"]) == 0
    bundle = load_bundle(tmp_path / "b")
    assert bundle.onnx_fp16_path is None and not (tmp_path / "b" / "model.fp16.onnx").exists()


def test_bundle_loads_and_normalizes_like_the_calibration(bundle_dir):
    bundle = load_bundle(bundle_dir)
    assert bundle.name == "weave" and bundle.input.dtype == "uint8" and bundle.threshold == 0.42
    scores = np.array([0.0, 0.1, 0.3, 0.42, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(bundle.normalize_score(scores), CALIBRATION.normalize(scores))
    # 0.5 + (score - threshold) / (max - min), clipped: 0.6 for 0.5, 0 and 1 at the ends
    assert bundle.normalize_score(0.5) == pytest.approx(0.6) and bundle.normalize_score(0.0) == 0.0
    assert bundle.normalize_score(1.0) == 1.0
    assert bundle.is_anomalous(0.42) and not bundle.is_anomalous(0.41)


def test_bundle_weights_load_in_pytorch(bundle_dir, model):
    """`diffad evaluate BUNDLE_DIR DATA_DIR` reads BUNDLE_DIR/model.safetensors."""
    loaded = ckpt.load_model(bundle_dir)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)[1], model(x)[1])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _set_schema(path, version):
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = version
    path.write_text(json.dumps(manifest))


def _drop_field(path, field):
    manifest = json.loads(path.read_text())
    del manifest[field]
    path.write_text(json.dumps(manifest))


def _add_file_entry(path, name):
    manifest = json.loads(path.read_text())
    (path.parent.parent / "outside.txt").write_text("not the bundle's")
    manifest["files"][name] = "0" * 64
    path.write_text(json.dumps(manifest))


def _point_onnx_at(path, name):
    manifest = json.loads(path.read_text())
    manifest["onnx"]["file"] = name
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, expected", [
    (lambda b: _flip_a_byte(b / "model.onnx"), r"corrupted: .*model\.onnx"),
    (lambda b: (b / "model.safetensors").unlink(), r"missing: .*model\.safetensors"),
    (lambda b: _set_schema(b / "bundle.json", 2), r"bundle\.json has schema_version 2; this diffad reads "
                                                  r"schema_version 1"),
    (lambda b: (b / "bundle.json").unlink(), r"bundle\.json is missing"),
    (lambda b: _drop_field(b / "bundle.json", "top_k"), r"bundle\.json lacks required fields: top_k"),
    (lambda b: _add_file_entry(b / "bundle.json", "../outside.txt"), r"lists a file outside the bundle: '\.\./outside"),
    (lambda b: _add_file_entry(b / "bundle.json", "/etc/hostname"),
     r"lists a file outside the bundle: '/etc/hostname'"),
    (lambda b: _point_onnx_at(b / "bundle.json", "../model.onnx"), r"lists a file outside the bundle"),
], ids=["corrupted-onnx", "missing-weights", "other-schema", "no-bundle-json", "missing-field", "file-above",
        "absolute-file", "onnx-above"])
def test_damaged_bundle_is_refused_naming_the_file(bundle_copy, damage, expected):
    load_bundle(bundle_copy)  # intact
    damage(bundle_copy)
    with pytest.raises(BundleError, match=expected):
        load_bundle(bundle_copy)


def test_sealing_skips_temporary_files(bundle_copy):
    from diffad.export.bundle import seal_bundle

    (bundle_copy / "model.onnx.tmp").write_text("{}")  # interrupted writes' leftovers
    (bundle_copy / "engine.plan.part").write_bytes(b"half")
    manifest = seal_bundle(bundle_copy, json.loads((bundle_copy / "bundle.json").read_text()))
    assert not {"model.onnx.tmp", "engine.plan.part"} & set(manifest["files"])
    assert "model.onnx" in manifest["files"]
    load_bundle(bundle_copy)


def test_bundle_module_does_not_import_torch():
    code = ("import sys, diffad.export.bundle, diffad.export.parity, diffad.export.tensorrt_engine; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the command line ----------------------------------------------------------------------------
def test_cli_export_end_to_end_without_calibration_or_tensorrt(tmp_path, capsys, caplog, monkeypatch):
    """An uncalibrated run, --tensorrt on a machine that cannot build engines: ONNX bundle, exit 0."""
    run = tmp_path / "plain_run"
    ckpt.save_model(run / ckpt.MODEL_FILE, perturbed_tiny_model(channels=1, seed=2))
    monkeypatch.setattr(exporter, "missing_for_tensorrt", lambda: ["the tensorrt Python package"])
    out = tmp_path / "bundle"
    assert main(["export", str(run), "--out", str(out), "--tensorrt", "--fp16", "--max-batch", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json", "model.fp16.onnx", "model.onnx",
                                                     "model.safetensors"]
    assert printed["files"] == ["model.fp16.onnx", "model.onnx", "model.safetensors"] and printed["engines"] == []
    assert printed["onnx"]["parity"]["passed"]
    bundle = load_bundle(out)
    assert bundle.input.channels == 1 and bundle.threshold is None and not bundle.calibrated
    with pytest.raises(BundleError, match="no calibration"):
        bundle.normalize_score(0.5)
    messages = [r.getMessage() for r in caplog.records if r.name == "diffad.export" and r.levelname == "WARNING"]
    assert any("calibration.json" in m and "diffad evaluate" in m for m in messages)
    assert [m for m in messages if "--tensorrt" in m] == [
        "--tensorrt: no engine built, this machine lacks the tensorrt Python package; the bundle holds the "
        "ONNX model only (build engines on the GPU host)"]
    assert not list(tmp_path.glob(".bundle.*"))  # no staging left behind


def test_cli_export_fails_on_parity_and_writes_nothing(run_dir, tmp_path, capsys, monkeypatch):
    real_export = exporter.export_onnx

    def export_a_different_model(model, *args, **kwargs):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.segmentation.head.bias.add_(0.05)
        return real_export(other, *args, **kwargs)

    monkeypatch.setattr(exporter, "export_onnx", export_a_different_model)
    out = tmp_path / "bundle"
    assert main(["export", str(run_dir), "--out", str(out)]) == 1
    assert "does not match the PyTorch model" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bundle.*"))


@pytest.mark.parametrize("args, message", [
    (["--fp16"], "--fp16 needs --tensorrt"),
    (["--max-batch", "4", "--timing-cache", "t.cache"], "--max-batch, --timing-cache need --tensorrt"),
    (["--tensorrt", "--min-batch", "8", "--opt-batch", "4"], "need --min-batch <= --opt-batch <= --max-batch"),
    (["--tensorrt", "--opt-batch", "64"], "need --min-batch <= --opt-batch <= --max-batch, got 1, 64, 32"),
    (["--opset", "17"], "opset must be at least 18"),
])
def test_cli_export_argument_errors(run_dir, tmp_path, capsys, args, message):
    out = tmp_path / "bundle"
    assert main(["export", str(run_dir), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_export_refuses_to_overwrite_and_rejects_bad_numbers(run_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run_dir), "--out", str(out), "--tensorrt", "--max-batch", "0"])
    assert exit_info.value.code == 2


def test_cli_export_names_a_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "no_run"), "--out", str(tmp_path / "b")]) == 2
    assert "no_run" in capsys.readouterr().err


# --- TensorRT: the parts that need no GPU ----------------------------------------------------------
def test_engine_options_are_checked():
    assert EngineOptions().precision == "fp32" and EngineOptions(fp16=True).precision == "fp16"
    EngineOptions(min_batch=4, opt_batch=4, max_batch=4)
    assert EngineOptions.from_partial(max_batch=4) == EngineOptions(min_batch=1, opt_batch=4, max_batch=4)
    assert EngineOptions.from_partial(min_batch=16).opt_batch == 16
    assert EngineOptions.from_partial().opt_batch == 8
    for bad, message in (({"min_batch": 0}, "--min-batch must be a positive integer, got 0"),
                         ({"min_batch": 4, "opt_batch": 2}, "need --min-batch <= --opt-batch <= --max-batch, got 4, 2"),
                         ({"opt_batch": 64, "max_batch": 32}, "got 1, 64, 32"),
                         ({"max_batch": -1}, "--max-batch must be a positive integer, got -1")):
        with pytest.raises(ValueError, match=re.escape(message)):
            EngineOptions(**bad)


def test_engine_filename():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert engine_filename("NVIDIA H100 80GB HBM3", "10.3.0", "fp16") == \
        "model.nvidia-h100-80gb-hbm3.trt10.3.0.fp16.engine"
    assert engine_filename("NVIDIA A100-SXM4-40GB", "10.0.1.6", "fp32") == \
        "model.nvidia-a100-sxm4-40gb.trt10.0.1.6.fp32.engine"
    with pytest.raises(ValueError, match="precision must be fp16 or fp32, got 'int8'"):
        engine_filename("Tesla T4", "10.3.0", "int8")
    with pytest.raises(ValueError, match=re.escape("TensorRT version must look like 10.3.0, got '10.3/../x'")):
        engine_filename("Tesla T4", "10.3/../x", "fp16")


ENTRY = {"file": "model.nvidia-a100-sxm4-40gb.trt10.3.0.fp16.engine", "gpu": "NVIDIA A100-SXM4-40GB",
         "compute_capability": "8.0", "tensorrt_version": "10.3.0", "precision": "fp16",
         "min_batch": 1, "opt_batch": 8, "max_batch": 32}


def test_check_engine_compatible():
    check_engine_compatible(ENTRY, "NVIDIA A100-SXM4-40GB", "10.3.0")  # accepted
    with pytest.raises(EngineMismatchError, match=r"built for GPU 'NVIDIA A100-SXM4-40GB' but this machine has "
                                                  r"'NVIDIA H100 80GB HBM3'"):
        check_engine_compatible(ENTRY, "NVIDIA H100 80GB HBM3", "10.3.0")
    with pytest.raises(EngineMismatchError, match=r"built with TensorRT 10\.3\.0 but this machine has TensorRT "
                                                  r"10\.5\.0"):
        check_engine_compatible(ENTRY, "NVIDIA A100-SXM4-40GB", "10.5.0")
    fp32 = {**ENTRY, "file": ENTRY["file"].replace("fp16", "fp32"), "precision": "fp32"}
    assert select_engine([fp32, ENTRY], "NVIDIA A100-SXM4-40GB", "10.3.0") == ENTRY
    assert select_engine([fp32, ENTRY], "NVIDIA A100-SXM4-40GB", "10.3.0", "fp32") == fp32
    assert select_engine([fp32, ENTRY], "Tesla T4", "10.3.0") is None


def test_tensorrt_parity_logic_with_onnxruntime_standing_in_for_the_engine(bundle_dir):
    """The engine check's batching and bounds, run with an ONNX Runtime session as the 'engine'."""
    onnx_path = bundle_dir / "model.onnx"
    session = onnxruntime_runner(onnx_path)
    options = EngineOptions(min_batch=3, opt_batch=12, max_batch=16, fp16=True)
    report = tensorrt_vs_onnx(session, onnx_path, "uint8", 32, 3, options)
    assert report["passed"] and set(report["batches"]) == {"3", "12", "16"}, "the profile's min, opt and max"
    # 16 images in whole batches of each size
    assert {k: b["images"] for k, b in report["batches"].items()} == {"3": 15, "12": 12, "16": 16}
    assert report["tolerance"] == TENSORRT_TOLERANCES["fp16"].to_dict()

    def off_by_a_little(images):  # what a poor fp16 engine might return
        maps, scores = session(images)
        return np.clip(maps + 0.02, 0, 1), scores + 0.01

    report = tensorrt_vs_onnx(off_by_a_little, onnx_path, "uint8", 32, 3, options)
    assert not report["passed"]
    assert any("maps differ" in f for f in report["failures"]) and any("scores differ" in f for f in report["failures"])


def test_missing_for_tensorrt_names_the_package():
    has_package = importlib.util.find_spec("tensorrt") is not None
    assert any("tensorrt" in m for m in missing_for_tensorrt()) == (not has_package)


@pytest.mark.skipif(bool(TENSORRT_MISSING), reason="needs an NVIDIA GPU, the tensorrt package and cuda-python; "
                    f"this machine lacks {', '.join(TENSORRT_MISSING)}")
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_tensorrt_engine_builds_and_matches_onnxruntime(bundle_copy, tmp_path, fp16):
    options = EngineOptions(min_batch=1, opt_batch=4, max_batch=8, fp16=fp16, timing_cache=tmp_path / "timing.cache")
    entry = add_engine(bundle_copy, options)
    assert entry["parity"]["passed"], entry["parity"]["failures"]
    assert entry["parity"]["tolerance"] == TENSORRT_TOLERANCES[options.precision].to_dict()
    assert (tmp_path / "timing.cache").stat().st_size > 0
    bundle = load_bundle(bundle_copy)  # the engine is listed and hashed
    assert bundle.engines == (entry,) and entry["file"] in bundle.manifest["files"]
    with EngineRunner(load_engine(bundle_copy, entry)) as runner:
        maps, scores = runner(parity_images(32, 3, count=3))
    assert maps.shape == (3, 1, 32, 32) and scores.shape == (3,)
