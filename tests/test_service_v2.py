"""The Open Inference Protocol (KServe v2): JSON and binary tensors over the ASGI app, then Triton's own
client (tritonclient.http) against a real `diffad serve`, both checked against ONNX Runtime on the bundle."""

import asyncio
import json

import numpy as np
import pytest
from diffad.export.bundle import load_bundle
from test_service import make_settings, make_tiny_bundle, reference, serving  # noqa: F401 (reference: a fixture)

SIZE = 32


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


def json_request(batch: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(batch.shape),
                        "data": batch.reshape(-1).tolist()}], **extra}


def test_metadata_health_and_readiness(bundle_dir):
    version = load_bundle(bundle_dir).version

    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, c):
            assert (await c.get("/v2/health/live")).status_code == 200
            assert (await c.get("/v2/health/ready")).json() == {"ready": True}
            assert (await c.get("/v2")).json()["extensions"] == ["binary_tensor_data"]
            meta = (await c.get("/v2/models/weave")).json()
            assert meta["versions"] == [version] and len(version) == 12
            assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 3, SIZE, SIZE]}]
            assert [o["name"] for o in meta["outputs"]] == ["anomaly_map", "score"]
            assert (await c.get(f"/v2/models/weave/versions/{version}")).status_code == 200
            assert (await c.get("/v2/models/weave/ready")).status_code == 200
            missing = await c.get("/v2/models/nope/ready")
            assert missing.status_code == 404 and "unknown model" in missing.json()["error"]
            wrong = await c.get("/v2/models/weave/versions/000000000000")
            assert wrong.status_code == 404 and version in wrong.json()["error"]
    asyncio.run(scenario())


def test_json_infer_matches_onnx_runtime(bundle_dir, reference):  # noqa: F811
    batch = images(3)
    expected_maps, expected_scores = reference(batch)

    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, c):
            r = await c.post("/v2/models/weave/infer", json=json_request(batch, id="req-1"))
            assert r.status_code == 200, r.text
            return r.json()

    answer = asyncio.run(scenario())
    assert answer["model_name"] == "weave" and answer["id"] == "req-1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["score"]["shape"] == [3] and outputs["anomaly_map"]["shape"] == [3, 1, SIZE, SIZE]
    np.testing.assert_allclose(outputs["score"]["data"], expected_scores, atol=1e-5)
    np.testing.assert_allclose(np.array(outputs["anomaly_map"]["data"]).reshape(3, 1, SIZE, SIZE), expected_maps,
                               atol=1e-5)


def test_binary_infer_matches_onnx_runtime(bundle_dir, reference):  # noqa: F811
    batch = images(2, seed=1)
    _, expected_scores = reference(batch)
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(batch.shape),
                                     "parameters": {"binary_data_size": batch.nbytes}}],
                         "outputs": [{"name": "score", "parameters": {"binary_data": True}}]}).encode()

    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, c):
            r = await c.post("/v2/models/weave/infer", content=header + batch.tobytes(),
                             headers={"Inference-Header-Content-Length": str(len(header)),
                                      "Content-Type": "application/octet-stream"})
            assert r.status_code == 200, r.text
            return r

    r = asyncio.run(scenario())
    length = int(r.headers["inference-header-content-length"])
    answer = json.loads(r.content[:length])
    (output,) = answer["outputs"]
    assert output["name"] == "score" and output["parameters"]["binary_data_size"] == 8
    np.testing.assert_allclose(np.frombuffer(r.content[length:], dtype="<f4"), expected_scores, atol=1e-5)


@pytest.mark.parametrize("request_body, status, words", [
    ({"inputs": []}, 400, "one input tensor"),
    ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 3, SIZE, SIZE], "data": []}]}, 400,
     "unknown input"),
    ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE], "data": []}]}, 400, "UINT8"),
    ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, 16, 16], "data": [0] * 768}]}, 400,
     "shape [N, 3, 32, 32]"),
    ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, SIZE, SIZE], "data": [300] * 3072}]}, 400,
     "0..255"),
    ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, SIZE, SIZE], "data": [1, 2]}]}, 400,
     "needs 3072 values"),
    ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [20, 3, SIZE, SIZE], "data": []}]}, 413,
     "at most 16"),
])
def test_bad_infer_requests_get_the_protocols_error(bundle_dir, request_body, status, words):
    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, c):
            r = await c.post("/v2/models/weave/infer", json=request_body)
            assert r.status_code == status, r.text
            assert words in r.json()["error"]
            # and the service goes on serving
            ok = await c.post("/v2/models/weave/infer", json=json_request(images(1)))
            assert ok.status_code == 200
    asyncio.run(scenario())


def test_tritonclient_calls_the_service_unchanged(bundle_dir, reference):  # noqa: F811
    httpclient = pytest.importorskip("tritonclient.http")
    from diffad.benchmarks.load import ServerProcess

    batch = images(4, seed=2)
    expected_maps, expected_scores = reference(batch)
    with ServerProcess(str(bundle_dir), "onnxruntime", max_batch_size=8, max_queue_delay_ms=5, concurrency=1,
                       threads=1) as server:
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("weave")
        assert client.get_model_metadata("weave")["inputs"][0]["name"] == "images"
        for binary in (True, False):  # tritonclient's default (binary tensors), then JSON
            tensor = httpclient.InferInput("images", list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("anomaly_map", "score")]
            result = client.infer("weave", [tensor], outputs=outputs, request_id=f"binary-{binary}")
            np.testing.assert_allclose(result.as_numpy("score"), expected_scores, atol=1e-5)
            np.testing.assert_allclose(result.as_numpy("anomaly_map"), expected_maps, atol=1e-5)
        result = client.infer("weave", [tensor])  # no outputs named: all of them, binary
        assert result.as_numpy("score").shape == (4,)
        with pytest.raises(httpclient.InferenceServerException, match="unknown model"):
            client.infer("nope", [tensor])
        client.close()
