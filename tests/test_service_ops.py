"""Running the service: settings, the CLI verbs, the engine cache, the serving path without torch, a real
`diffad serve` process under SIGTERM, and `diffad bench load` on a tiny bundle.

The TensorRT engine itself is built only where a GPU and the tensorrt package are present; the cache's
bookkeeping (sidecars, matching, refusals) is tested everywhere, with the GPU and TensorRT version given.
"""

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffad.benchmarks.load import free_port
from diffad.export import tensorrt_engine as te
from diffad.export.bundle import load_bundle, sha256_file
from diffad.export.parity import ONNX_TOLERANCE, TENSORRT_TOLERANCES, onnxruntime_runner, parity_images
from diffad.service.backends import (
    BackendUnavailable,
    BatchGraphs,
    TensorRTBackend,
    batch_buckets,
    find_engine,
    open_backend,
    torch_precision,
)
from diffad.service.settings import Settings, load_settings
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from test_service import encode, make_tiny_bundle, noise_image

from diffad.cli import main
from diffad.hardware import cpu_computes_bf16

TENSORRT_MISSING = te.missing_for_tensorrt()
GPU = te.GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
TRT = "10.3.0"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No DIFFAD_ variable or .env from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("DIFFAD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


# --- settings ------------------------------------------------------------------------------------
def test_settings_come_from_flags_then_environment_then_the_settings_file(clean_env, tmp_path):
    settings_file = tmp_path / "diffad.env"
    settings_file.write_text("DIFFAD_PORT=9001\nDIFFAD_MAX_BATCH_SIZE=4\nDIFFAD_API_KEYS=key-a,key-b\n")
    clean_env.setenv("DIFFAD_SETTINGS_FILE", str(settings_file))
    clean_env.setenv("DIFFAD_MODELS", "bundles/a, bundles/b")
    clean_env.setenv("DIFFAD_MAX_BATCH_SIZE", "16")
    settings = load_settings()
    assert settings.models == [Path("bundles/a"), Path("bundles/b")]
    assert settings.port == 9001 and settings.max_batch_size == 16  # the environment beats the file
    assert [k.get_secret_value() for k in settings.api_keys] == ["key-a", "key-b"]
    assert "key-a" not in repr(settings)  # secrets stay out of logs and tracebacks
    flagged = load_settings(port=None, max_batch_size=2)  # a flag not given does not mask the rest
    assert flagged.port == 9001 and flagged.max_batch_size == 2
    clean_env.setenv("DIFFAD_MODELS", '["x", "y z"]')
    assert load_settings().models == [Path("x"), Path("y z")]

    clean_env.delenv("DIFFAD_SETTINGS_FILE")
    (tmp_path / ".env").write_text("DIFFAD_BACKEND=torch\nDIFFAD_LOG_LEVEL=WARNING\nOTHER_TOOL=1\n")
    settings = load_settings()
    assert settings.backend == "torch" and settings.log_level == "warning" and settings.api_keys == []


@pytest.mark.parametrize("name, value", [("DIFFAD_BACKEND", "cuda"), ("DIFFAD_MAX_BATCH_SIZE", "0"),
                                         ("DIFFAD_MAX_QUEUE_DELAY_MS", "-1"), ("DIFFAD_PORT", "http"),
                                         ("DIFFAD_API_KEYS", "a,,b , ")])
def test_bad_settings_are_refused(clean_env, name, value):
    clean_env.setenv(name, value)
    if name == "DIFFAD_API_KEYS":  # empty items are dropped; an explicit empty key is refused
        assert [k.get_secret_value() for k in load_settings().api_keys] == ["a", "b"]
        clean_env.setenv(name, '["a", ""]')
    with pytest.raises(ValidationError, match=name.removeprefix("DIFFAD_").lower()):
        load_settings()


def test_a_named_settings_file_must_exist(clean_env, tmp_path):
    clean_env.setenv("DIFFAD_SETTINGS_FILE", str(tmp_path / "nope.env"))
    with pytest.raises(ValueError, match="no such file"):
        load_settings()


# --- the command line ----------------------------------------------------------------------------
def test_serve_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--backend", "--max-batch-size", "--max-queue-delay-ms", "--engine-cache",
                 "DIFFAD_API_KEYS", "DIFFAD_MODELS"):
        assert flag in out, flag


def test_serve_refuses_missing_bundles_with_a_clear_message(clean_env, capsys, tmp_path):
    assert main(["serve"]) == 2
    assert "no model to serve" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "bundle folder not found" in capsys.readouterr().err


@pytest.mark.skipif(not TENSORRT_MISSING, reason="this machine can build engines")
def test_engines_without_a_gpu_says_so_and_exits_0(bundle_dir, tmp_path, capsys):
    cache = tmp_path / "engines"
    assert main(["engines", str(bundle_dir), "--cache-dir", str(cache), "--fp16"]) == 0
    out = capsys.readouterr().out
    assert "nothing to build" in out and "ONNX Runtime" in out
    assert not cache.exists()


def test_engines_argument_errors(bundle_dir, tmp_path, capsys, clean_env):
    assert main(["engines", str(bundle_dir)]) == 2
    assert "--cache-dir" in capsys.readouterr().err
    assert main(["engines", str(tmp_path / "nope"), "--cache-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["engines", str(bundle_dir), "--cache-dir", str(tmp_path), "--min-batch", "9", "--max-batch", "4"]) == 2


# --- the engine cache ----------------------------------------------------------------------------
def cache_engine(cache_dir: Path, onnx_sha: str, gpu=GPU.name, trt=TRT, precision="fp16", content=b"engine") -> dict:
    """An engine file and its sidecar, as `diffad engines` writes them (the engine bytes are a stand-in)."""
    name = te.cached_engine_filename("weave", onnx_sha, gpu, trt, precision)
    (cache_dir / name).write_bytes(content)
    record = {"file": name, "bundle_name": "weave", "onnx_sha256": onnx_sha, "gpu": gpu, "compute_capability": "9.0",
              "tensorrt_version": trt, "precision": precision, "min_batch": 1, "opt_batch": 8, "max_batch": 32,
              "engine_sha256": sha256_file(cache_dir / name)}
    te.write_engine_record(cache_dir, record)
    return record


def test_cached_engine_filename():
    sha = "ab" * 32
    assert (te.cached_engine_filename("we/ird name", sha, GPU.name, TRT, "fp16")
            == "we-ird-name.abababababababab.nvidia-h100-80gb-hbm3.trt10.3.0.fp16.engine")
    with pytest.raises(ValueError, match="SHA-256"):
        te.cached_engine_filename("weave", "../../etc", GPU.name, TRT, "fp16")


def test_cached_engine_matches_only_its_model_gpu_and_tensorrt_version(tmp_path):
    mine, other = "a" * 64, "b" * 64
    fp32 = cache_engine(tmp_path, mine, precision="fp32")
    fp16 = cache_engine(tmp_path, mine, precision="fp16")
    cache_engine(tmp_path, other)
    cache_engine(tmp_path, mine, gpu="NVIDIA A100-SXM4-40GB")
    cache_engine(tmp_path, mine, trt="10.1.0")
    found, passed_over = te.find_cached_engine(tmp_path, mine, GPU.name, TRT)
    assert found.record == fp16 and found.path == tmp_path / fp16["file"]  # fp16 preferred
    assert te.find_cached_engine(tmp_path, mine, GPU.name, TRT, "fp32")[0].record == fp32
    reasons = " | ".join(passed_over)
    assert len(passed_over) == 3
    assert "built from another model.onnx" in reasons and "A100" in reasons and "TensorRT 10.1.0" in reasons
    assert "diffad engines" in reasons
    assert te.find_cached_engine(tmp_path, "c" * 64, GPU.name, TRT)[0] is None
    with pytest.raises(te.EngineMismatchError, match="another model.onnx"):
        te.check_cached_engine(fp16, other, GPU.name, TRT)


def test_cached_engine_that_was_altered_or_points_elsewhere_is_refused(tmp_path, caplog):
    sha = "a" * 64
    record = cache_engine(tmp_path, sha)
    (tmp_path / record["file"]).write_bytes(b"engine, truncated")
    found, passed_over = te.find_cached_engine(tmp_path, sha, GPU.name, TRT)
    assert found is None and "truncated or replaced" in passed_over[0]

    escaping = {**record, "file": "../elsewhere.engine"}
    (tmp_path / "x.engine.json").write_text(json.dumps(escaping))
    (tmp_path / record["file"]).unlink()
    (tmp_path / "broken.engine.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="diffad.export"):
        found, passed_over = te.find_cached_engine(tmp_path, sha, GPU.name, TRT)
    assert found is None
    assert any("not a file of" in r for r in passed_over) and any("is missing" in r for r in passed_over)
    assert "broken.engine.json" in caplog.text


def test_the_tensorrt_backend_takes_a_cached_engine_only_if_its_sidecar_matches(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(te, "missing_for_tensorrt", lambda: [])
    monkeypatch.setattr(te, "detect_gpu", lambda: GPU)
    monkeypatch.setattr(te, "tensorrt_version", lambda: TRT)
    bundle = load_bundle(bundle_dir)
    onnx_sha = te.bundle_onnx_sha256(bundle)
    assert onnx_sha == sha256_file(bundle.onnx_path)

    choice, why = find_engine(bundle, None)
    assert choice is None and "no engine cache is set" in why
    cache_engine(tmp_path, "f" * 64)  # another model's engine
    choice, why = find_engine(bundle, tmp_path)
    assert choice is None and "neither the bundle nor the engine cache" in why
    record = cache_engine(tmp_path, onnx_sha, precision="fp32")
    choice, why = find_engine(bundle, tmp_path)
    assert choice.source == "cache" and choice.record == record and choice.folder == str(tmp_path)


@pytest.mark.skipif(not TENSORRT_MISSING, reason="this machine has TensorRT and a GPU")
def test_backend_choice_without_tensorrt(bundle_dir, caplog):
    bundle = load_bundle(bundle_dir)
    with caplog.at_level(logging.INFO, logger="diffad.service"):
        backend = open_backend(bundle, Settings(_env_file=None, backend="auto", threads=1))
    assert backend.name in ("onnxruntime-cpu", "onnxruntime-cuda")
    assert f"backend auto chose {backend.name}" in caplog.text and "this machine lacks" in caplog.text
    with pytest.raises(BackendUnavailable, match="backend tensorrt for model weave: this machine lacks"):
        open_backend(bundle, Settings(_env_file=None, backend="tensorrt"))
    with pytest.raises(te.TensorRTUnavailable):
        te.build_cached_engine(bundle_dir, "unused", te.EngineOptions())


@pytest.mark.skipif(bool(TENSORRT_MISSING), reason="needs an NVIDIA GPU, tensorrt and cuda-python")
def test_engines_builds_into_the_cache_and_the_service_uses_it(bundle_dir, tmp_path, capsys):
    bundle_copy = shutil.copytree(bundle_dir, tmp_path / "bundle")
    manifest_before = (bundle_copy / "bundle.json").read_bytes()
    cache = tmp_path / "engines"
    assert main(["engines", str(bundle_copy), "--cache-dir", str(cache), "--max-batch", "8"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["status"] == "built"
    assert (bundle_copy / "bundle.json").read_bytes() == manifest_before  # the bundle was only read
    record = json.loads((cache / (Path(result["file"]).name + ".json")).read_text())
    bundle = load_bundle(bundle_copy)
    assert record["onnx_sha256"] == te.bundle_onnx_sha256(bundle) and record["parity"]["passed"]
    assert record["max_batch"] == 8 and record["tensorrt_version"] == te.tensorrt_version()
    assert main(["engines", str(bundle_copy), "--cache-dir", str(cache), "--max-batch", "8"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "cached"

    choice, _ = find_engine(bundle, cache)
    backend = TensorRTBackend(bundle, choice)
    try:
        images = parity_images(bundle.input.size, bundle.input.channels, count=8)
        maps, scores = backend(images)
        ref_maps, ref_scores = onnxruntime_runner(bundle.onnx_path)(images)
        tolerance = TENSORRT_TOLERANCES["fp32"]
        assert np.abs(maps - ref_maps).max() <= tolerance.map and np.abs(scores - ref_scores).max() <= tolerance.score
    finally:
        backend.close()


def test_torch_backend_matches_onnxruntime(bundle_dir):
    bundle = load_bundle(bundle_dir)
    backend = open_backend(bundle, Settings(_env_file=None, backend="torch"))  # threads unset: torch is global
    images = parity_images(bundle.input.size, bundle.input.channels, count=4)
    maps, scores = backend(images)
    ref_maps, ref_scores = onnxruntime_runner(bundle.onnx_path)(images)
    assert backend.name == "torch-cpu" and maps.shape == (4, 1, 32, 32) and scores.shape == (4,)
    assert np.abs(maps - ref_maps).max() <= ONNX_TOLERANCE.map
    assert np.abs(scores - ref_scores).max() <= ONNX_TOLERANCE.score


# --- the serving path needs no torch -------------------------------------------------------------
def test_serving_path_does_not_import_torch(bundle_dir):
    code = textwrap.dedent(f"""
        import sys, time
        from diffad.service.app import create_app
        from diffad.service.settings import Settings
        from diffad.cli import main
        from starlette.testclient import TestClient

        # `diffad serve` as the command line runs it, up to the point where uvicorn would take over
        import diffad.service.server as server
        built = []
        server.serve = lambda settings: built.append(create_app(settings))
        assert main(["serve", {str(bundle_dir)!r}, "--backend", "onnxruntime"]) == 0 and built
        app = create_app(Settings(_env_file=None, models=[{str(bundle_dir)!r}], backend="onnxruntime", threads=1))
        with TestClient(app) as client:
            for _ in range(600):
                if client.get("/readyz").status_code == 200:
                    break
                time.sleep(0.05)
            answer = client.post("/inspect", files={{"file": ("x.png", open(sys.argv[1], "rb"), "image/png")}})
            assert answer.status_code == 200, answer.text
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("torch modules:", loaded)
        sys.exit(1 if loaded else 0)
    """)
    image = bundle_dir.parent / "no-torch.png"
    image.write_bytes(encode(noise_image(40, 40)))
    result = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch modules: []" in result.stdout


# --- a real server process -----------------------------------------------------------------------
def start_server(bundle_dir, log_path, *flags):
    port = free_port()
    command = [sys.executable, "-m", "diffad.cli", "serve", str(bundle_dir), "--port", str(port),
               "--backend", "onnxruntime", "--threads", "1", *flags]
    log = open(log_path, "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DIFFAD_API_KEYS": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, Path(log_path).read_text()
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.1)


def queue_depth(url) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "diffad_queue_depth"
               for s in f.samples)


def test_an_upload_over_the_limit_is_answered_413_over_a_real_socket(bundle_dir, tmp_path):
    """Clients still sending their too-large uploads read the 413 (the body is read and dropped, up to 64 MiB),
    not a connection reset; the server goes on serving."""
    process, url = start_server(bundle_dir, tmp_path / "server.log", "--max-upload-bytes", "100000")
    too_large = os.urandom(24 << 20)  # 24 MiB, far over the limit: refused from its Content-Length

    async def clients():
        statuses = []
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one():
                for _ in range(2):
                    try:
                        r = await client.post("/inspect?map=none", files={"file": ("big.png", too_large, "image/png")})
                        statuses.append((r.status_code, r.json()["detail"]))
                    except httpx.HTTPError as e:
                        statuses.append((type(e).__name__, ""))
            await asyncio.gather(*(one() for _ in range(4)))
        return statuses

    try:
        statuses = asyncio.run(clients())
        assert [s for s, _ in statuses] == [413] * 8, statuses
        assert all("request body larger than" in detail for _, detail in statuses)
        fine = httpx.post(url + "/inspect?map=none", files={"file": ("ok.png", encode(noise_image(40, 40)),
                                                                     "image/png")}, timeout=30)
        assert fine.status_code == 200, fine.text
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_sigterm_answers_503_on_an_open_port_for_the_grace_then_drains_and_exits(bundle_dir, tmp_path):
    log_path = tmp_path / "server.log"
    process, url = start_server(bundle_dir, log_path, "--max-batch-size", "8", "--max-queue-delay-ms", "3000",
                                "--drain-grace-s", "3")
    image = encode(noise_image(40, 40))
    try:
        with ThreadPoolExecutor(3) as pool:
            pending = [pool.submit(httpx.post, url + "/inspect", files={"file": ("p.png", image, "image/png")},
                                   timeout=60) for _ in range(3)]
            deadline = time.monotonic() + 30
            while queue_depth(url) < 3:  # all three wait for the batch to fill
                assert time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.3)
            # within the grace the port is open: a load balancer reads 503, not "connection refused"
            late = httpx.post(url + "/inspect", files={"file": ("p.png", image, "image/png")}, timeout=10)
            ready = httpx.get(url + "/readyz", timeout=10)
            within_grace = time.monotonic() - signalled < 3
            answers = [f.result() for f in pending]
        # uvicorn re-raises the signal once it has shut down gracefully, so the status says "SIGTERM"
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        exited_after = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    assert within_grace, "the checks above took longer than the grace: the machine is too loaded to tell"
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert late.status_code == 503 and late.headers["Retry-After"] == "1"
    assert late.json()["detail"] == "the service is shutting down"
    assert ready.status_code == 503 and ready.json()["detail"]["draining"] is True
    assert exited_after >= 3  # the port stayed open for the whole grace
    log = log_path.read_text()
    assert "closing the listener in 3 s" in log and "Application shutdown complete" in log
    assert "Traceback" not in log


def test_a_second_sigterm_ends_the_grace_at_once(bundle_dir, tmp_path):
    process, url = start_server(bundle_dir, tmp_path / "server.log", "--drain-grace-s", "60")
    try:
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(url + "/readyz", timeout=10).status_code == 503  # draining, still listening
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 30  # not the 60 s grace
    finally:
        if process.poll() is None:
            process.kill()


def test_bench_load_reports_batching_and_bare_backend(bundle_dir, tmp_path, capsys):
    out = tmp_path / "load.json"
    assert main(["bench", "load", str(bundle_dir), "--requests", "24", "--concurrency", "4", "--threads", "1",
                 "--max-batch-size", "8", "--max-queue-delay-ms", "20", "--bare-seconds", "0.2",
                 "--json", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    assert result["benchmark"] == "load" and result["model"] == "weave"
    batching, plain = result["runs"]
    assert (batching["mode"], batching["max_batch_size"], plain["mode"], plain["max_batch_size"]) == (
        "batching", 8, "no-batching", 1)
    for run in (batching, plain):
        assert run["requests"] == run["ok"] == 24 and run["statuses"] == {"200": 24}
        assert run["throughput_img_s"] > 0 and run["server_backend"] == "onnxruntime-cpu"
        latency = run["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    # 4 clients and a 20 ms window: some batches hold more than one request; without batching none does
    assert plain["server_mean_batch_size"] == 1.0 and batching["server_mean_batch_size"] > 1.0
    assert [row["batch"] for row in result["bare_backend"]] == [8, 1]
    assert all(row["images_per_s"] > 0 for row in result["bare_backend"])
    assert result["batching_speedup"] == pytest.approx(batching["throughput_img_s"] / plain["throughput_img_s"],
                                                       rel=1e-2)


def test_bench_overload_counts_every_request_and_loses_none_on_sigterm(bundle_dir, tmp_path, capsys):
    out = tmp_path / "overload.json"
    # a generous deadline: on a loaded machine a 600 px upload must still be answered, not time out
    assert main(["bench", "overload", str(bundle_dir), "--seconds", "1.5", "--concurrency", "4", "--multiples", "2",
                 "--timeout-s", "30",
                 "--threads", "1", "--large-side", "600", "--large-concurrency", "2", "--drain-grace-s", "3",
                 "--json", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    phases = result["phases"]
    assert list(phases) == ["capacity", "2x", "large_images", "sigterm"]
    assert result["capacity_img_s"] == phases["capacity"]["throughput_img_s"] > 0
    over = phases["2x"]
    assert over["offered_img_s"] == pytest.approx(2 * result["capacity_img_s"], rel=0.01)
    assert sum(over["statuses"].values()) == over["sent"] > 0  # every request sent has an outcome
    assert over["computed_images"] >= over["statuses"].get("200", 0)
    assert over["computed_unanswered"] == over["computed_images"] - over["statuses"].get("200", 0)
    assert phases["large_images"]["statuses"] == {"200": phases["large_images"]["ok"]}
    stop = phases["sigterm"]
    # the port stays open through the grace: whatever is not answered is refused with 503, never lost
    assert stop["lost"] == 0 and stop["answered"] + stop["refused_503"] == stop["sent"]
    assert stop["refused_503"] > 0 and stop["answered"] > 0
    assert all(p["peak_rss_mib"] > 0 for p in (over, stop, phases["large_images"]))


# --- the torch backend's GPU path: its logic here, the GPU itself where there is one -------------
def test_batch_buckets_are_powers_of_two_up_to_the_largest():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError, match="positive"):
        batch_buckets(0)


def test_batch_graphs_pad_to_the_bucket_and_cut_the_results_back():
    """Our code around CUDA graphs, with a fake capture: not the graphs themselves."""
    captured, calls = [], []

    def capture(size):
        captured.append(size)

        def replay(images):
            assert len(images) == size, "a graph replays only the batch size it was captured for"
            calls.append(images.copy())
            return images * 10, images.sum(axis=(1, 2, 3))

        return replay

    graphs = BatchGraphs(capture, 8)
    graphs.capture_all()
    assert captured == [8, 4, 2, 1]  # largest first, so the smaller share its memory pool
    images = np.arange(3 * 2 * 1 * 1, dtype=np.float32).reshape(3, 2, 1, 1)
    maps, scores = graphs(images)
    assert captured == [8, 4, 2, 1], "a captured bucket is replayed, not captured again"
    assert calls[-1].shape[0] == 4 and np.array_equal(calls[-1][3], images[2])  # padded with the last image
    np.testing.assert_array_equal(maps, images * 10)
    np.testing.assert_array_equal(scores, images.sum(axis=(1, 2, 3)))
    with pytest.raises(ValueError, match="larger than the largest"):
        graphs(np.zeros((9, 2, 1, 1), dtype=np.float32))


@pytest.mark.parametrize("choice, device, native, expected", [
    ("auto", "cuda", False, "fp16"), ("auto", "cpu", True, "fp32"), ("bf16", "cuda", False, "bf16"),
    ("bf16", "cpu", True, "bf16"), ("fp32", "cuda", False, "fp32"),
    ("fp16", "cpu", True, "needs a CUDA GPU"), ("bf16", "cpu", False, "no native bf16"),
])
def test_torch_precision_follows_the_device(choice, device, native, expected):
    if expected.startswith(("fp", "bf")):
        assert torch_precision(choice, device, native) == expected
    else:
        with pytest.raises(BackendUnavailable, match=expected):
            torch_precision(choice, device, native)


def test_auto_takes_torch_where_only_torch_sees_a_gpu(bundle_dir, monkeypatch):
    """No TensorRT engine, no ONNX Runtime CUDA provider, torch sees a GPU: auto serves with torch."""
    from diffad.service import backends

    monkeypatch.setattr(backends, "torch_sees_a_gpu", lambda: True)
    backend = open_backend(load_bundle(bundle_dir), Settings(_env_file=None, backend="auto"))
    assert backend.name.startswith("torch-")


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_torch_backend_bf16_networks_stay_close_to_fp32(bundle_dir):
    bundle = load_bundle(bundle_dir)
    backend = open_backend(bundle, Settings(_env_file=None, backend="torch", torch_precision="bf16"))
    images = parity_images(bundle.input.size, bundle.input.channels, count=4)
    maps, scores = backend(images)
    ref_maps, ref_scores = onnxruntime_runner(bundle.onnx_path)(images)
    assert backend.precision == "bf16" and backend.model.network_dtype == torch.bfloat16
    assert 0 < np.abs(maps - ref_maps).max() <= 0.05 and np.abs(scores - ref_scores).max() <= 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA-graph path)")
def test_torch_backend_on_cuda_with_graphs_matches_fp32(bundle_dir):
    bundle = load_bundle(bundle_dir)
    backend = open_backend(bundle, Settings(_env_file=None, backend="torch"))
    backend.prepare(8)
    images = parity_images(bundle.input.size, bundle.input.channels, count=8)
    ref_maps, ref_scores = onnxruntime_runner(bundle.onnx_path)(images)
    for count in (1, 3, 8):  # a bucket exactly, a padded one, the largest
        maps, scores = backend(images[:count])
        assert maps.shape == (count, 1, bundle.input.size, bundle.input.size)
        assert np.abs(maps - ref_maps[:count]).max() <= TENSORRT_TOLERANCES["fp16"].map
        assert np.abs(scores - ref_scores[:count]).max() <= TENSORRT_TOLERANCES["fp16"].score
    assert backend.precision == "fp16" and backend.graphs.buckets == [1, 2, 4, 8]
