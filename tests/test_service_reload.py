"""Model versions without restarts: POST /models/{name}/reload serves a bundle folder's new version, warmed up
beside the old one, switched at once, in-flight requests finished on the old one; a bad new version leaves
the old one serving. The version (ONNX hash) is in every answer, in /models and in the metrics."""

import asyncio
import json
import shutil
import threading

import numpy as np
import pytest
from diffad.evaluation.evaluate import CALIBRATION_FILE
from diffad.export.bundle import load_bundle, seal_bundle
from diffad.export.exporter import export_bundle
from diffad.export.parity import onnxruntime_runner
from diffad.models import checkpoint as ckpt
from prometheus_client.parser import text_string_to_metric_families
from test_service import (
    CALIBRATION,
    as_batch,
    encode,
    make_settings,
    make_tiny_bundle,
    noise_image,
    serving,
    until,
    upload,
    wrapping_factory,
)
from test_service_v2 import json_request
from tiny_models import perturbed_tiny_model


@pytest.fixture(scope="module")
def new_version(tmp_path_factory):
    """The same model name with other weights: what a retrained, re-exported bundle looks like."""
    run = tmp_path_factory.mktemp("runs-v2") / "weave"
    ckpt.save_model(run / ckpt.MODEL_FILE, perturbed_tiny_model(channels=3, seed=1))
    (run / CALIBRATION_FILE).write_text(json.dumps(CALIBRATION.to_dict()))
    out = tmp_path_factory.mktemp("bundles-v2") / "weave"
    export_bundle(run, out)
    return out


@pytest.fixture
def served(tmp_path_factory, tmp_path):
    """A private copy of the tiny bundle, so a test can replace its files."""
    return shutil.copytree(make_tiny_bundle(tmp_path_factory), tmp_path / "weave")


def replace_bundle(folder, source):
    for item in folder.iterdir():
        item.unlink()
    for item in source.iterdir():
        shutil.copy(item, folder / item.name)


def model_info(text: str) -> dict:
    return {s.labels["version"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if f.name == "diffad_model_info"}


def test_reload_switches_to_the_new_version_under_load(served, new_version):
    old_version, new = load_bundle(served).version, load_bundle(new_version).version
    assert old_version != new
    image = noise_image(40, 30, seed=3)
    expected_new = float(onnxruntime_runner(load_bundle(new_version).onnx_path)(as_batch(image))[1][0])

    async def scenario():
        async with serving(make_settings(served, max_batch_size=4)) as (_, c):
            assert (await c.post("/models/weave/reload")).json()["reloaded"] is False  # nothing new yet
            assert (await c.get("/models")).json()["models"][0]["version"] == old_version
            answers: list[tuple[int, str]] = []
            per_client: list[list[str]] = [[] for _ in range(4)]
            stop = asyncio.Event()

            async def client(mine: list[str]):
                while not stop.is_set():
                    r = await c.post("/inspect?map=none", files=upload(encode(image)))
                    answers.append((r.status_code, r.json().get("model_version") or r.json().get("detail")))
                    mine.append(r.json().get("model_version"))

            clients = [asyncio.create_task(client(mine)) for mine in per_client]
            while len(answers) < 8:
                await asyncio.sleep(0.01)
            replace_bundle(served, new_version)
            reload = await c.post("/models/weave/reload")
            after = len(answers)
            while len(answers) < after + 8:
                await asyncio.sleep(0.01)
            stop.set()
            await asyncio.gather(*clients)
            last = (await c.post("/inspect?map=none", files=upload(encode(image)))).json()
            metrics = (await c.get("/metrics")).text
            models = (await c.get("/models")).json()["models"]
            return reload, answers, per_client, last, metrics, models

    reload, answers, per_client, last, metrics, models = asyncio.run(scenario())
    assert reload.status_code == 200, reload.text
    body = reload.json()
    assert (body["reloaded"], body["version"], body["previous_version"]) == (True, new, old_version)
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200]
    assert {v for _, v in answers} == {old_version, new}
    for versions in per_client:  # each client sends one request after the other: one switch, no going back
        switch = versions.index(new) if new in versions else len(versions)
        assert set(versions[:switch]) <= {old_version} and set(versions[switch:]) <= {new}, versions
    assert last["model_version"] == new and last["image_score"] == pytest.approx(expected_new, abs=1e-5)
    assert models[0]["version"] == new and models[0]["state"] == "ready"
    assert model_info(metrics) == {new: 1.0}, "the old version's series is gone"


def answered_across_a_reload(served, new_version, send):
    """`send(client)`'s request, its batch held on the old version's backend until the reload has switched
    to the new one: its response, and the reload's answer."""
    new = load_bundle(new_version).version
    created: dict = {}

    async def scenario():
        async with serving(make_settings(served), wrapping_factory(created)) as (app, c):
            runtime = app.state.registry.find(None)
            old_backend = created["weave"]
            old_backend.gate, old_backend.entered = threading.Event(), threading.Event()
            in_flight = asyncio.ensure_future(send(c))
            await until(old_backend.entered.is_set)  # its batch runs on the old version, held by the gate
            replace_bundle(served, new_version)
            reload = asyncio.ensure_future(c.post("/models/weave/reload"))
            await until(lambda: runtime.bundle.version == new, timeout_s=30)  # switched; the old batch still held
            old_backend.gate.set()
            return await in_flight, (await reload).json()

    response, reload = asyncio.run(scenario())
    assert reload["reloaded"] and reload["version"] == new
    return response


def test_a_request_in_flight_during_a_reload_is_answered_and_labelled_by_the_old_version(served, new_version):
    """Its batch is running on the old version when the switch happens: the answer is the old version's
    computation, so it must carry the old version's id (and calibration), not the new one's."""
    old_version = load_bundle(served).version
    image = noise_image(40, 30, seed=4)
    expected_old = float(onnxruntime_runner(load_bundle(served).onnx_path)(as_batch(image))[1][0])
    answer = answered_across_a_reload(served, new_version,
                                      lambda c: c.post("/inspect?map=none", files=upload(encode(image)))).json()
    assert answer["model_version"] == old_version
    assert answer["image_score"] == pytest.approx(expected_old, abs=1e-5)


def test_a_v2_request_in_flight_during_a_reload_is_answered_by_one_version_and_says_which(served, new_version):
    """The Open Inference Protocol's batch: all its images queued on the version that serves when it is read,
    answered by it alone (the old one here, after the switch) and named by it."""
    old_version = load_bundle(served).version
    batch = np.concatenate([as_batch(noise_image(40, 30, seed=s)) for s in (5, 6, 7)])
    expected_old = onnxruntime_runner(load_bundle(served).onnx_path)(batch)[1]
    answer = answered_across_a_reload(served, new_version,
                                      lambda c: c.post("/v2/models/weave/infer", json=json_request(batch)))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == old_version
    scores = next(o for o in body["outputs"] if o["name"] == "score")["data"]
    np.testing.assert_allclose(scores, expected_old, atol=1e-5)


def test_a_broken_new_version_leaves_the_old_one_serving(served):
    old_version = load_bundle(served).version

    async def scenario():
        async with serving(make_settings(served)) as (_, c):
            onnx = served / "model.onnx"
            onnx.write_bytes(onnx.read_bytes()[:-100])  # truncated: its hash no longer matches bundle.json
            refused = await c.post("/models/weave/reload")
            still = await c.post("/inspect?map=none", files=upload(encode(noise_image(20, 20))))
            return refused, still, (await c.get("/metrics")).text

    refused, still, metrics = asyncio.run(scenario())
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert f"version {old_version} still serves" in detail and "model.onnx" in detail
    assert still.status_code == 200 and still.json()["model_version"] == old_version
    assert 'diffad_model_reloads_total{model="weave",result="failed"} 1.0' in metrics


def test_a_new_version_with_another_input_is_refused(served, tmp_path):
    manifest = json.loads((served / "bundle.json").read_text())

    async def scenario():
        async with serving(make_settings(served)) as (_, c):
            seal_bundle(served, {**manifest, "input": {**manifest["input"], "size": 64}})
            return await c.post("/models/weave/reload"), await c.post("/models/nope/reload")

    refused, unknown = asyncio.run(scenario())
    assert refused.status_code == 409 and "restart to change it" in refused.json()["detail"]
    assert unknown.status_code == 404


def test_reload_needs_the_api_key_when_keys_are_set(served):
    async def scenario():
        async with serving(make_settings(served, api_keys=["k1"])) as (_, c):
            without = await c.post("/models/weave/reload")
            with_key = await c.post("/models/weave/reload", headers={"X-API-Key": "k1"})
            return without, with_key

    without, with_key = asyncio.run(scenario())
    assert without.status_code == 401 and with_key.status_code == 200
