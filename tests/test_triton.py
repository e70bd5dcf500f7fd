"""The Triton model repository (`diffad export-triton`) and the gateway (DIFFAD_BACKEND=triton), against a
real tritonserver.

The binary comes from PyPI's nvidia-pytriton wheel (`make install` adds it on Linux x86-64). That build has
the Python backend only, so the served model is a Python-backend twin of the exported one
(diffad.benchmarks.local_triton: the same model.onnx with ONNX Runtime, the exported config with its
backend swapped); the exported config itself goes through Triton's own parser (it gets as far as looking
for the onnxruntime backend library) and through model_config.proto. Where the wheel cannot run, the
Triton tests skip and say why; DIFFAD_TRITON_REQUIRED=1 (.ci/run) makes that a failure.
"""

import asyncio
import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from diffad.benchmarks.local_triton import TritonServer, find_tritonserver, free_port, twin_repository
from diffad.export.bundle import load_bundle, seal_bundle
from diffad.export.triton import (
    CONFIG_FILE,
    TritonExportError,
    TritonOptions,
    export_model,
    export_repository,
    resolve_bundle_dir,
)
from diffad.service.backends import BackendUnavailable, TritonBackend, parse_triton_url
from google.protobuf import text_format
from PIL import Image
from test_service import SIZE, make_settings, make_tiny_bundle, serving
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

REQUIRED = os.environ.get("DIFFAD_TRITON_REQUIRED") == "1"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)


def renamed_copy(bundle_dir: Path, folder: Path, name: str, perturb_onnx: bool = False) -> Path:
    """The bundle under another name (another Triton model); perturb_onnx: also another version."""
    copy = shutil.copytree(bundle_dir, folder / name)
    if perturb_onnx:  # a different file, the same graph: ONNX ignores a changed doc_string
        import onnx

        model = onnx.load(copy / "model.onnx")
        model.doc_string = f"another export of {name}"
        onnx.save(model, copy / "model.onnx")
    manifest = json.loads((copy / "bundle.json").read_text())
    seal_bundle(copy, {**manifest, "name": name})
    return copy


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Triton's own schema: text_format.Parse refuses unknown fields and wrong types."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


# --- the repository --------------------------------------------------------------------------------
def test_config_is_a_valid_triton_model_config_with_the_bundles_interface(bundle_dir, tmp_path):
    options = TritonOptions(max_batch_size=16, max_queue_delay_us=2500, max_queue_size=64, instances=2,
                            kind="cpu", keep_versions=3)
    (result,) = export_repository([bundle_dir], tmp_path / "repo", options)
    config = parse_config((tmp_path / "repo" / "weave" / CONFIG_FILE).read_text())
    bundle = load_bundle(bundle_dir)
    assert result["version"] == 1 and result["platform"] == "onnxruntime"
    assert config.name == "weave" and config.backend == "onnxruntime" and config.max_batch_size == 16
    (images,) = config.input
    assert (images.name, model_config_pb2.DataType.Name(images.data_type), list(images.dims)) == (
        "images", "TYPE_UINT8", [3, SIZE, SIZE])
    outputs = {o.name: o for o in config.output}
    assert list(outputs["anomaly_map"].dims) == [1, SIZE, SIZE]
    assert list(outputs["score"].dims) == [1] and outputs["score"].HasField("reshape")
    assert list(outputs["score"].reshape.shape) == []  # the graph's [batch] score, rank 0 per request
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
        (2, "KIND_CPU")]
    assert config.version_policy.latest.num_versions == 3
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert float(params["threshold"]) == bundle.threshold == 0.42
    assert float(params["score_min"]) == 0.1 and float(params["score_max"]) == 0.9
    assert params["diffad_bundle_version"] == bundle.version and params["input_color"] == "RGB"
    # The version folder is the bundle itself, verified on load.
    assert load_bundle(tmp_path / "repo" / "weave" / "1").version == bundle.version


def test_versions_are_numbered_reused_and_the_config_follows_the_newest(bundle_dir, tmp_path):
    repo = tmp_path / "repo"
    first = export_model(bundle_dir, repo)
    again = export_model(bundle_dir, repo)
    assert (first["version"], first["new_version"]) == (1, True)
    assert (again["version"], again["new_version"]) == (1, False)  # the same model.onnx: the same version
    newer = renamed_copy(bundle_dir, tmp_path / "v2", "weave", perturb_onnx=True)
    second = export_model(newer, repo)
    assert (second["version"], second["new_version"], second["config_updated"]) == (2, True, True)
    params = parse_config((repo / "weave" / CONFIG_FILE).read_text()).parameters
    assert params["diffad_bundle_version"].string_value == load_bundle(newer).version
    old = export_model(bundle_dir, repo)  # re-exporting version 1 leaves the newest's config alone
    assert (old["version"], old["config_updated"]) == (1, False)
    assert parse_config((repo / "weave" / CONFIG_FILE).read_text()).parameters[
        "diffad_bundle_version"].string_value == load_bundle(newer).version
    assert resolve_bundle_dir(repo / "weave") == repo / "weave" / "2"
    assert resolve_bundle_dir(bundle_dir) == bundle_dir
    assert sorted(p.name for p in (repo / "weave").iterdir()) == ["1", "2", CONFIG_FILE]  # no staging left


def test_tensorrt_engines_become_a_plan_per_compute_capability(bundle_dir, tmp_path):
    bundle = renamed_copy(bundle_dir, tmp_path, "plan")
    engines = []
    for cc, precision, min_batch in (("9.0", "fp32", 1), ("9.0", "fp16", 1), ("8.9", "fp16", 1), ("8.0", "fp16", 4)):
        name = f"model.gpu{cc.replace('.', '')}.trt10.8.0.{precision}.engine"
        (bundle / name).write_bytes(os.urandom(64))
        engines.append({"file": name, "gpu": f"GPU {cc}", "compute_capability": cc, "tensorrt_version": "10.8.0",
                        "precision": precision, "min_batch": min_batch, "opt_batch": 8, "max_batch": 32})
    seal_bundle(bundle, {**json.loads((bundle / "bundle.json").read_text()), "engines": engines})
    result = export_model(bundle, tmp_path / "repo", TritonOptions(tensorrt=True, tensorrt_version="10.8.0"))
    config = parse_config((tmp_path / "repo" / "plan" / CONFIG_FILE).read_text())
    assert config.platform == "tensorrt_plan" and not config.backend
    # fp16 first; the 8.0 engine's profile starts at batch 4, which Triton's batches from 1 cannot use
    assert dict(config.cc_model_filenames) == {"9.0": "model.gpu90.trt10.8.0.fp16.engine",
                                               "8.9": "model.gpu89.trt10.8.0.fp16.engine"}
    assert result["engines"] == dict(config.cc_model_filenames)
    with pytest.raises(TritonExportError, match="TensorRT 10.9.0"):
        export_model(bundle, tmp_path / "repo2", TritonOptions(tensorrt=True, tensorrt_version="10.9.0"))
    with pytest.raises(TritonExportError, match="no TensorRT engine"):
        export_model(bundle_dir, tmp_path / "repo3", TritonOptions(tensorrt=True))


def test_bad_bundles_and_options_are_refused_before_anything_is_written(bundle_dir, tmp_path):
    odd = renamed_copy(bundle_dir, tmp_path, "has space")
    with pytest.raises(TritonExportError, match="not a Triton model name"):
        export_model(odd, tmp_path / "repo")
    twin = renamed_copy(bundle_dir, tmp_path / "b", "weave")
    with pytest.raises(TritonExportError, match="two bundles are named 'weave'"):
        export_repository([bundle_dir, twin], tmp_path / "repo")
    broken = renamed_copy(bundle_dir, tmp_path / "c", "broken")
    (broken / "model.onnx").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="corrupted"):
        export_model(broken, tmp_path / "repo")
    with pytest.raises(TritonExportError, match="GPUs only"):
        TritonOptions(tensorrt=True, kind="cpu")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_the_cli_writes_the_repository_and_says_what_it_did(bundle_dir, tmp_path):
    from diffad.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export-triton", str(bundle_dir), "--out", str(tmp_path / "repo"), "--kind", "cpu"]) == 0
    report = json.loads(out.getvalue())
    assert report["models"][0]["model"] == "weave" and report["models"][0]["version"] == 1
    assert main(["export-triton", str(tmp_path / "nope"), "--out", str(tmp_path / "repo")]) == 2


def test_gateway_settings_and_urls():
    assert parse_triton_url("http://triton:8000") == ("http", "triton:8000")
    assert parse_triton_url("grpc://10.0.0.5:8001/") == ("grpc", "10.0.0.5:8001")
    assert parse_triton_url("triton:8000") == ("http", "triton:8000")
    for bad in ("ftp://x:1", "http://", "http://x:1/v2"):
        with pytest.raises(BackendUnavailable, match="DIFFAD_TRITON_URL"):
            parse_triton_url(bad)
    with pytest.raises(ValueError, match="DIFFAD_TRITON_URL"):
        make_settings("/nowhere", backend="triton")


@pytest.mark.parametrize("message, status, expected", [
    ("Exceeds maximum queue size", "503", 429),
    ("Request timeout expired", "503", 504),
    ("Request for unknown model: 'weave' is not found", "400", 503),
    ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", 503),
    ("in ensemble 'x', shape mismatch", "400", None),
])
def test_tritons_errors_become_the_services(message, status, expected):
    backend = TritonBackend.__new__(TritonBackend)  # only the mapping: no server
    backend.model_name, backend.model_version, backend.url, backend.timeout_s = "weave", "1", "http://t:8000", 30.0
    error = backend.upstream_error(InferenceServerException(message, status=status))
    assert getattr(error, "status", None) == expected
    if expected == 503:
        assert error.backend_ok is False and error.retry_after_s == 1  # counts toward turning the model unready
    if expected is None:
        assert isinstance(error, RuntimeError) and message in str(error)


# --- a real tritonserver ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tritonserver_paths():
    paths, why = find_tritonserver()
    if paths is None:
        if REQUIRED:
            pytest.fail(f"DIFFAD_TRITON_REQUIRED=1 but {why}")
        pytest.skip(why)
    return paths


def test_tritons_own_parser_accepts_the_exported_config(bundle_dir, tritonserver_paths, tmp_path):
    repo = tmp_path / "repo"
    export_repository([bundle_dir], repo, TritonOptions(kind="cpu"))
    broken = renamed_copy(bundle_dir, tmp_path / "b", "broken")
    export_model(broken, repo, TritonOptions(kind="cpu"))
    config = repo / "broken" / CONFIG_FILE  # two score values per image cannot reshape to rank 0: refused
    config.write_text(config.read_text().replace("dims: [ 1 ] reshape", "dims: [ 2 ] reshape"))
    server = TritonServer(tritonserver_paths, repo, tmp_path, "--model-control-mode=explicit",
                          "--strict-model-config=true")
    server.start()
    try:
        status, body = server.post("/v2/repository/models/weave/load")
        # Parsed and validated: it fails only for the backend library that this build of Triton lacks.
        assert status == 400 and "unable to find backend library for backend 'onnxruntime'" in body, body
        status, body = server.post("/v2/repository/models/broken/load")  # while this one fails its validation
        assert status != 200 and "backend library" not in body, body
        assert "model output 'score' has different size for dims and reshape" in server.log_tail(200)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway_repo(bundle_dir, tmp_path_factory):
    """The production repository (weave: 200 ms for a batch to fill, so that replicas sending at once are
    merged even on a loaded machine; slow: 1 s a batch, a queue of 1) and its twin, for one Triton."""
    root = tmp_path_factory.mktemp("triton")
    slow = renamed_copy(bundle_dir, root / "bundles", "slow")
    repo = root / "repo"
    export_repository([bundle_dir], repo, TritonOptions(kind="cpu", max_queue_delay_us=200_000, max_batch_size=8))
    export_model(slow, repo, TritonOptions(kind="cpu", max_queue_size=1, max_batch_size=1))
    return repo, twin_repository(repo, root / "twin", delays={"slow": 1.0})


@pytest.fixture(scope="module")
def triton(gateway_repo, tritonserver_paths, tmp_path_factory):
    server = TritonServer(tritonserver_paths, gateway_repo[1], tmp_path_factory.mktemp("triton-run"))
    server.start()
    yield server
    server.stop()


def upload(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def gateway_settings(repo: Path, url: str, models=("weave",), **overrides):
    return make_settings(repo / models[0], models=[repo / m for m in models], backend="triton", triton_url=url,
                         triton_health_interval_s=0.2, **overrides)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_gateway_answers_as_the_in_process_backend_does(gateway_repo, triton, bundle_dir, protocol):
    repo = gateway_repo[0]
    url = triton.http_url if protocol == "http" else f"grpc://127.0.0.1:{triton.grpc_port}"
    batch = np.random.default_rng(3).integers(0, 256, (3, 3, SIZE, SIZE), dtype=np.uint8)
    v2_request = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(batch.shape),
                              "data": batch.reshape(-1).tolist()}]}

    async def answers(settings):
        async with serving(settings) as (_, c):
            inspected = [(await c.post("/inspect?map=none", files={"file": ("p.png", upload(s), "image/png")}))
                         for s in range(3)]
            v2 = await c.post("/v2/models/weave/infer", json=v2_request)
            models = (await c.get("/models")).json()
            return [r.json() for r in inspected], v2.json(), models

    gateway, v2, models = asyncio.run(answers(gateway_settings(repo, url)))
    direct, direct_v2, _ = asyncio.run(answers(make_settings(bundle_dir)))
    assert [a["image_score"] for a in gateway] == pytest.approx([a["image_score"] for a in direct], abs=1e-6)
    assert [a["is_anomalous"] for a in gateway] == [a["is_anomalous"] for a in direct]
    assert {a["model_version"] for a in gateway} == {load_bundle(bundle_dir).version}
    ours = {o["name"]: np.array(o["data"]) for o in v2["outputs"]}
    theirs = {o["name"]: np.array(o["data"]) for o in direct_v2["outputs"]}
    np.testing.assert_allclose(ours["anomaly_map"], theirs["anomaly_map"], atol=1e-6)
    np.testing.assert_allclose(ours["score"], theirs["score"], atol=1e-6)
    (listed,) = models["models"] if isinstance(models, dict) else models
    assert listed["backend"] == f"triton-{protocol}"


def test_replicas_share_triton_and_triton_batches_their_requests(gateway_repo, triton):
    """Four gateways (replicas) each send single images at once: Triton's dynamic batcher merges them."""
    repo = gateway_repo[0]
    key = 'model="weave",version="1"'
    before = triton.metrics()

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            clients = [(await stack.enter_async_context(serving(gateway_settings(repo, triton.http_url,
                                                                                  max_batch_size=1))))[1]
                       for _ in range(4)]
            for round_ in range(3):
                answers = await asyncio.gather(*(
                    c.post("/inspect?map=none", files={"file": ("p.png", upload(10 * round_ + i), "image/png")})
                    for i, c in enumerate(clients)))
                assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]

    asyncio.run(scenario())
    after = triton.metrics()
    requests = after[f"nv_inference_request_success{{{key}}}"] - before.get(f"nv_inference_request_success{{{key}}}", 0)
    executions = after[f"nv_inference_exec_count{{{key}}}"] - before.get(f"nv_inference_exec_count{{{key}}}", 0)
    assert requests >= 12 and executions < requests, (requests, executions)


def test_a_full_triton_queue_answers_429_with_retry_after(gateway_repo, triton):
    """'slow' takes 1 s a batch with a queue of 1: of six gateways sending at once, some are refused."""
    repo = gateway_repo[0]

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            clients = [(await stack.enter_async_context(serving(gateway_settings(repo, triton.http_url, ("slow",),
                                                                                  max_batch_size=1))))[1]
                       for _ in range(6)]
            return await asyncio.gather(*(
                c.post("/inspect?map=none", files={"file": ("p.png", upload(i), "image/png")})
                for i, c in enumerate(clients)))

    answers = asyncio.run(scenario())
    statuses = sorted(a.status_code for a in answers)
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["Retry-After"] == "1" and "queue" in refused.json()["detail"]


def test_a_stopped_triton_answers_503_turns_the_model_unready_and_it_recovers(gateway_repo, tritonserver_paths,
                                                                              tmp_path):
    server = TritonServer(tritonserver_paths, gateway_repo[1], tmp_path)
    server.start()

    async def scenario():
        async with serving(gateway_settings(gateway_repo[0], server.http_url)) as (_, c):
            assert (await c.post("/inspect?map=none", files={"file": ("p.png", upload(0), "image/png")})).status_code \
                == 200
            server.stop()
            gone = await c.post("/inspect?map=none", files={"file": ("p.png", upload(1), "image/png")})
            # Triton's refusal passed on, or (when the readiness watch saw it first) the model's own unready 503
            assert gone.status_code == 503 and int(gone.headers["Retry-After"]) >= 1, gone.text
            deadline = time.monotonic() + 10
            while (ready := await c.get("/readyz")).status_code == 200:
                assert time.monotonic() < deadline, "the model stayed ready without Triton"
                await asyncio.sleep(0.1)
            assert "Triton" in json.dumps(ready.json())
            await asyncio.to_thread(server.start, same_ports=True)  # back: the model is opened again (backoff)
            deadline = time.monotonic() + 30
            while (await c.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "the model did not recover with Triton"
                await asyncio.sleep(0.1)
            again = await c.post("/inspect?map=none", files={"file": ("p.png", upload(2), "image/png")})
            assert again.status_code == 200, again.text

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_gateway_bundle_that_triton_does_not_serve_is_refused(gateway_repo, triton, bundle_dir, tmp_path):
    other = renamed_copy(bundle_dir, tmp_path, "weave", perturb_onnx=True)  # another version, not in Triton
    settings = gateway_settings(gateway_repo[0], triton.http_url)
    with pytest.raises(BackendUnavailable, match="newest version is bundle version"):
        TritonBackend(load_bundle(other), settings.triton_url, 5.0)
    with pytest.raises(BackendUnavailable, match="unreachable"):
        TritonBackend(load_bundle(gateway_repo[0] / "weave" / "1"), f"http://127.0.0.1:{free_port()}", 2.0)


def test_a_new_version_rolls_out_through_triton_and_the_gateways_reload(bundle_dir, tritonserver_paths, tmp_path):
    """The documented rollout: export version 2 next to 1 (Triton keeps the newest two), Triton loads it,
    then each gateway's reload moves it to version 2; until then it keeps asking for version 1."""
    repo = tmp_path / "repo"
    export_model(bundle_dir, repo, TritonOptions(kind="cpu"))
    twin = twin_repository(repo, tmp_path / "twin")
    server = TritonServer(tritonserver_paths, twin, tmp_path, "--model-control-mode=explicit", "--load-model=*")
    server.start()
    newer = renamed_copy(bundle_dir, tmp_path / "v2", "weave", perturb_onnx=True)

    async def scenario():
        async with serving(gateway_settings(repo, server.http_url)) as (_, c):
            png = {"file": ("p.png", upload(0), "image/png")}
            before = (await c.post("/inspect?map=none", files=png)).json()
            assert (await c.post("/models/weave/reload")).json()["reloaded"] is False  # nothing new yet
            assert export_model(newer, repo, TritonOptions(kind="cpu"))["version"] == 2
            shutil.rmtree(twin)
            twin_repository(repo, twin)
            # Triton has not loaded version 2 yet: the gateway refuses it and keeps serving version 1
            refused = await c.post("/models/weave/reload")
            assert refused.status_code == 409 and "version 2" in refused.json()["detail"], refused.text
            assert (await c.post("/inspect?map=none", files=png)).json()["model_version"] == before["model_version"]
            assert (await asyncio.to_thread(server.post, "/v2/repository/models/weave/load"))[0] == 200
            reload = await c.post("/models/weave/reload")
            after = (await c.post("/inspect?map=none", files=png)).json()
            return before, reload, after

    try:
        before, reload, after = asyncio.run(scenario())
    finally:
        server.stop()
    assert reload.status_code == 200 and reload.json()["reloaded"] is True, reload.text
    assert before["model_version"] == load_bundle(bundle_dir).version
    assert after["model_version"] == load_bundle(newer).version != before["model_version"]
    assert after["image_score"] == pytest.approx(before["image_score"], abs=1e-6)  # the same graph, re-exported
