"""POST /inspect/batch: several views of one part in one request, each through the same admission, limits
and batcher as /inspect, answered in order, one bad file failing only itself."""

import asyncio

import numpy as np
import pytest
from test_service import (
    as_batch,
    encode,
    make_settings,
    make_tiny_bundle,
    noise_image,
    reference,  # noqa: F401 (a fixture)
    serving,
    upload,
    wrapping_factory,
)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)


def files(*parts):
    """httpx's multipart list: the same field name repeated, as curl -F files=@a -F files=@b sends it."""
    return [("files", part) for part in parts]


def test_batch_answers_each_file_in_order_and_bad_files_fail_alone(bundle_dir, reference):  # noqa: F811
    images = [noise_image(40, 30, seed=s) for s in range(3)]
    created = {}
    factory = wrapping_factory(created)

    async def scenario():
        async with serving(make_settings(bundle_dir, max_batch_size=8, max_queue_delay_ms=50), factory) as (_, c):
            parts = files(("a.png", encode(images[0]), "image/png"),
                          ("broken.png", b"\x89PNG\r\n\x1a\nno", "image/png"),
                          ("b.png", encode(images[1]), "image/png"),
                          ("notes.txt", b"hello", "text/plain"),
                          ("c.png", encode(images[2]), "image/png"))
            warm_up = len(created["weave"].batches)
            r = await c.post("/inspect/batch?map=none", files=parts)
            assert r.status_code == 200, r.text
            return r.json(), created["weave"].batches[warm_up:]

    body, batches = asyncio.run(scenario())
    assert body["model"] == "weave"
    results = body["results"]
    assert [item["index"] for item in results] == [0, 1, 2, 3, 4]
    assert [item["filename"] for item in results] == ["a.png", "broken.png", "b.png", "notes.txt", "c.png"]
    assert results[1]["error"]["status"] == 400 and "result" not in results[1]
    assert results[3]["error"]["status"] == 415
    for item, image in zip([results[0], results[2], results[4]], images, strict=True):
        assert "error" not in item
        _, expected = reference(as_batch(image))
        assert item["result"]["image_score"] == pytest.approx(float(expected[0]), abs=1e-5)
        assert (item["result"]["width"], item["result"]["height"]) == (40, 30)
        assert "anomaly_map" not in item["result"]
    # the good files were batched together by the dynamic batcher, not run one by one
    assert sum(len(b) for b in batches) == 3 and max(len(b) for b in batches) > 1, [len(b) for b in batches]


def test_batch_maps_are_those_of_single_requests(bundle_dir):
    image = encode(noise_image(40, 30, seed=5))

    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, c):
            single = (await c.post("/inspect", files=upload(image))).json()
            batch = (await c.post("/inspect/batch", files=files(("x.png", image, "image/png")))).json()
            return single, batch["results"][0]["result"]

    single, batched = asyncio.run(scenario())
    assert batched["anomaly_map"] == single["anomaly_map"]
    assert batched["image_score"] == single["image_score"]


def test_batch_over_the_file_limit_is_refused_whole(bundle_dir):
    image = encode(noise_image(20, 20))

    async def scenario():
        async with serving(make_settings(bundle_dir, max_files_per_request=2)) as (_, c):
            r = await c.post("/inspect/batch", files=files(*[(f"{i}.png", image, "image/png") for i in range(3)]))
            return r

    r = asyncio.run(scenario())
    assert r.status_code == 413 and "at most 2" in r.json()["detail"]


def test_each_file_of_a_batch_takes_its_own_place_in_the_queue(bundle_dir):
    """With room for one request, the batch's first file takes the request's place and the others get 429."""
    image = encode(noise_image(20, 20))

    async def scenario():
        async with serving(make_settings(bundle_dir, max_queue_size=1, max_batch_size=1)) as (_, c):
            r = await c.post("/inspect/batch?map=none", files=files(*[(f"{i}.png", image, "image/png")
                                                                      for i in range(4)]))
            return r.json()["results"]

    results = asyncio.run(scenario())
    assert "result" in results[0]
    refused = [item for item in results[1:] if "error" in item]
    assert refused and all(item["error"]["status"] == 429 for item in refused)
    assert all("queue limit" in item["error"]["detail"] for item in refused)


def test_batch_upload_limit_is_per_file(bundle_dir):
    small, large = encode(noise_image(20, 20)), np.random.default_rng(0).bytes(6000)

    async def scenario():
        async with serving(make_settings(bundle_dir, max_upload_bytes=5000)) as (_, c):
            r = await c.post("/inspect/batch?map=none", files=files(("s.png", small, "image/png"),
                                                                    ("l.png", large, "image/png")))
            return r

    r = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    small_item, large_item = r.json()["results"]
    assert "result" in small_item and large_item["error"]["status"] == 413
