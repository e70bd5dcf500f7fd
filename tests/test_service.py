"""The inspection service over HTTP: the real app (lifespan, batcher, ONNX Runtime backend) on a tiny bundle.

Each test builds its own app with the settings it needs and talks to it through httpx's ASGI transport,
inside asyncio.run. Backends are wrapped (never replaced) where a test needs to hold a batch, fail one
or see which images were computed.
"""

import asyncio
import base64
import contextlib
import io
import json
import re
import shutil
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from diffad.evaluation.evaluate import CALIBRATION_FILE, Calibration
from diffad.export.bundle import BundleError, load_bundle, seal_bundle
from diffad.export.exporter import export_bundle
from diffad.export.parity import onnxruntime_runner
from diffad.models import checkpoint as ckpt
from diffad.service.app import create_app
from diffad.service.backends import open_backend
from diffad.service.images import decode_image
from diffad.service.settings import Settings
from diffad.training.data import to_mode
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import perturbed_tiny_model

SIZE = 32
CALIBRATION = Calibration(threshold=0.42, method="f1", score_min=0.1, score_max=0.9, num_images=12)


# --- fixtures ------------------------------------------------------------------------------------
def make_tiny_bundle(tmp_path_factory):
    """A tiny 3-channel model with randomised weights (non-trivial maps), exported as a real bundle.

    Made once per test session (kept under pytest's base temp folder) for every test_service* module.
    """
    out = tmp_path_factory.getbasetemp() / "service-bundles" / "weave"
    if (out / "bundle.json").is_file():
        return out
    model = perturbed_tiny_model(channels=3, seed=0)
    run = tmp_path_factory.mktemp("runs") / "weave"
    ckpt.save_model(run / ckpt.MODEL_FILE, model)
    (run / CALIBRATION_FILE).write_text(json.dumps(CALIBRATION.to_dict()))
    export_bundle(run, out)
    return out


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def second_bundle_dir(bundle_dir, tmp_path_factory):
    """The same graph under another name: a second model to route to."""
    copy = shutil.copytree(bundle_dir, tmp_path_factory.mktemp("bundles2") / "grid")
    manifest = json.loads((copy / "bundle.json").read_text())
    seal_bundle(copy, {**manifest, "name": "grid"})
    return copy


@pytest.fixture(scope="module")
def reference(bundle_dir):
    """The backend computed directly: uint8 NCHW -> (maps, scores), ONNX Runtime on the CPU."""
    return onnxruntime_runner(load_bundle(bundle_dir).onnx_path)


def make_settings(bundle_dir, **overrides) -> Settings:
    values = {"models": [bundle_dir], "backend": "onnxruntime", "threads": 1, **overrides}
    return Settings(_env_file=None, **values)


class WrappedBackend:
    """The real backend, plus: a record of every batch computed, an optional gate that holds each batch
    until opened, and an optional failure for images whose first pixel has a given value."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.max_batch_size, self.bundle = inner.name, inner.max_batch_size, inner.bundle
        self.device, self.precision, self.fallback = inner.device, inner.precision, inner.fallback
        self.takes_categories = inner.takes_categories
        self.batches: list[np.ndarray] = []
        self.batch_categories: list[np.ndarray | None] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail_on_value: int | None = None

    def __call__(self, images, categories=None):
        self.batches.append(images.copy())
        self.batch_categories.append(None if categories is None else categories.copy())
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail_on_value is not None and (images[:, 0, 0, 0] == self.fail_on_value).any():
            raise RuntimeError("injected failure")
        return self.inner(images) if categories is None else self.inner(images, categories)

    def close(self):
        self.inner.close()

    def prepare(self, max_batch_size):
        self.inner.prepare(max_batch_size)

    def describe(self):
        return "wrapped " + self.inner.describe()

    def computed_values(self) -> list[list[int]]:
        """The first pixel of each image of each batch: which images ran, in which batches."""
        return [[int(v) for v in batch[:, 0, 0, 0]] for batch in self.batches]


def wrapping_factory(created: dict):
    def factory(bundle, settings):
        created[bundle.name] = WrappedBackend(open_backend(bundle, settings))
        return created[bundle.name]
    return factory


@contextlib.asynccontextmanager
async def serving(settings, backend_factory=None, wait_ready=True):
    app = create_app(settings, backend_factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=30) as client:
            if wait_ready:
                await until_ready(client)
            yield app, client


async def until_ready(client, timeout_s=30.0, model=None):
    deadline = time.monotonic() + timeout_s
    params = {"model": model} if model else None
    while (await client.get("/readyz", params=params)).status_code != 200:
        assert time.monotonic() < deadline, "service not ready in time"
        await asyncio.sleep(0.02)


async def until(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# --- images --------------------------------------------------------------------------------------
def noise_image(width, height, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)


def solid_image(value, size=SIZE) -> bytes:
    """A flat image whose first pixel is `value` after preprocessing: identifies it in a batch."""
    return encode(Image.new("RGB", (size, size), (value, value, value)))


def encode(image: Image.Image, fmt="PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def upload(data: bytes, content_type="image/png", name="part.png"):
    return {"file": (name, data, content_type)}


def as_batch(image: Image.Image) -> np.ndarray:
    """Independent preprocessing for the reference: RGB, bilinear to the model's size, NCHW uint8."""
    array = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)
    return array.transpose(2, 0, 1)[None].copy()


def decode_map(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.mode == "L"
    return image


def png_header(width, height) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with almost no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# --- a correct answer ----------------------------------------------------------------------------
def test_inspect_answers_png_jpeg_gray_and_rgba_like_the_backend(bundle_dir, reference):
    rgb = noise_image(48, 40, seed=1)
    jpeg = encode(noise_image(56, 30, seed=2), "JPEG", quality=90)
    gray = noise_image(40, 64, "L", seed=3)
    rgba = noise_image(36, 44, "RGBA", seed=4)
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    cases = [  # (upload, content type, the picture the model should see)
        (encode(rgb), "image/png", rgb),
        (jpeg, "image/jpeg", Image.open(io.BytesIO(jpeg))),
        (encode(gray), "image/png", gray),
        (encode(rgba), "application/octet-stream", Image.alpha_composite(black, rgba)),  # as training does
    ]

    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, client):
            answers = [await client.post("/inspect", files=upload(data, ctype)) for data, ctype, _ in cases]
            no_map = await client.post("/inspect", params={"map": "none"}, files=upload(cases[0][0]))
            custom = await client.post("/inspect", params={"threshold": "0.99"}, files=upload(cases[0][0]))
            return answers, no_map, custom

    answers, no_map, custom = asyncio.run(scenario())
    for response, (_, _, picture) in zip(answers, cases, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"model", "model_version", "image_score", "normalized_score", "threshold",
                             "is_anomalous", "anomaly_map", "map_width", "map_height", "width", "height", "timings_ms"}
        assert body["model_version"] == load_bundle(bundle_dir).version
        assert (body["map_width"], body["map_height"]) == picture.size
        maps, scores = reference(as_batch(picture))
        assert body["model"] == "weave"
        assert body["image_score"] == pytest.approx(float(scores[0]), abs=1e-6)
        expected_norm = np.clip(0.5 + (scores[0] - 0.42) / (0.9 - 0.1), 0, 1)
        assert body["normalized_score"] == pytest.approx(float(expected_norm), abs=1e-6)
        assert body["threshold"] == 0.42 and body["is_anomalous"] == bool(scores[0] >= 0.42)
        assert (body["width"], body["height"]) == picture.size
        anomaly_map = decode_map(body["anomaly_map"])
        assert anomaly_map.size == picture.size  # the input's own resolution
        expected = Image.fromarray(maps[0, 0], "F").resize(picture.size, Image.Resampling.BILINEAR)
        assert np.abs(np.asarray(anomaly_map, float) - np.asarray(expected) * 255).max() <= 1.0
        timings = body["timings_ms"]
        assert set(timings) == {"queue", "inference", "total"}
        assert min(timings.values()) >= 0 and timings["queue"] + timings["inference"] <= timings["total"] + 1e-3
    assert no_map.status_code == 200 and "anomaly_map" not in no_map.json()
    assert no_map.json()["image_score"] == answers[0].json()["image_score"]
    assert custom.json()["threshold"] == 0.99 and custom.json()["is_anomalous"] is False


def test_exif_orientation_is_applied(bundle_dir, reference):
    picture = noise_image(48, 24, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated 90 degrees clockwise
    data = encode(picture, "JPEG", quality=95, exif=exif)

    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, client):
            return await client.post("/inspect", files=upload(data, "image/jpeg"))

    body = asyncio.run(scenario()).json()
    upright = Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_270)
    assert (body["width"], body["height"]) == (24, 48) == upright.size
    assert decode_map(body["anomaly_map"]).size == (24, 48)
    assert body["image_score"] == pytest.approx(float(reference(as_batch(upright))[1][0]), abs=1e-6)


def test_large_jpeg_is_decoded_reduced_and_its_map_capped(bundle_dir, reference):
    # a smooth 1600x1200 picture: decoded at a reduced DCT scale (1/8 would still be 4x the model's side:
    # 200x150 for 32 px), the model's input within a grey level or two of the full decode's
    yy, xx = np.mgrid[0:1200, 0:1600]
    pixels = np.stack([(xx / 7) % 256, (yy / 5) % 256, (xx + yy) / 11 % 256], -1).astype(np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG", quality=95)
    full = as_batch(Image.open(io.BytesIO(data)))
    decoded = decode_image(data, SIZE, 3, 50_000_000)
    assert decoded.decoded_size == (200, 150)  # 1/8 of the pixels per side: 1/64 of the memory
    assert (decoded.width, decoded.height) == (1600, 1200)  # the upload's own size, not the reduced one
    assert np.abs(decoded.array.astype(int) - full[0]).mean() < 2.0

    async def scenario():
        async with serving(make_settings(bundle_dir, max_map_pixels=120_000)) as (_, client):
            return await client.post("/inspect", files=upload(data, "image/jpeg"))

    body = asyncio.run(scenario()).json()
    assert (body["width"], body["height"]) == (1600, 1200)
    assert (body["map_width"], body["map_height"]) == (400, 300)  # 120,000 pixels, the aspect kept
    assert decode_map(body["anomaly_map"]).size == (400, 300)
    assert body["image_score"] == pytest.approx(float(reference(decoded.array[None])[1][0]), abs=1e-6)


def test_decoding_converts_every_mode_as_training_does():
    rng = np.random.default_rng(0)
    sixteen = Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16))
    palette = noise_image(30, 20, seed=6).quantize(16)
    cases = {"I;16": sixteen, "P": palette, "1": noise_image(30, 20, "L").convert("1"),
             "LA": noise_image(30, 20, "RGBA").convert("LA"), "CMYK": noise_image(30, 20).convert("CMYK")}
    for mode, image in cases.items():
        fmt = "TIFF" if mode in ("CMYK", "LA") else "PNG"
        data = encode(image, fmt)
        opened = Image.open(io.BytesIO(data))
        for channels in (1, 3):
            decoded = decode_image(data, SIZE, channels, max_pixels=10**6)
            expected = np.asarray(to_mode(opened, channels).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
            expected = expected[None] if channels == 1 else expected.transpose(2, 0, 1)
            assert decoded.array.shape == (channels, SIZE, SIZE) and decoded.array.dtype == np.uint8, mode
            np.testing.assert_array_equal(decoded.array, expected, err_msg=mode)
            assert (decoded.width, decoded.height) == (30, 20)
    # 16 bits are scaled to 8, not clipped: a mid-grey 16-bit image stays mid-grey
    mid = decode_image(encode(Image.fromarray(np.full((8, 8), 32768, np.uint16))), SIZE, 1, 10**6)
    assert np.all(mid.array == 127)


# --- dynamic batching ----------------------------------------------------------------------------
def test_concurrent_requests_are_batched_with_the_results_of_one_by_one(bundle_dir):
    images = [encode(noise_image(40, 40, seed=10 + i)) for i in range(8)]
    created: dict = {}

    async def scenario(settings, concurrent):
        async with serving(settings, wrapping_factory(created)) as (app, client):
            created["weave"].batches.clear()  # forget the warm-up
            if concurrent:
                answers = await asyncio.gather(*(client.post("/inspect", files=upload(d)) for d in images))
            else:
                answers = [await client.post("/inspect", files=upload(d)) for d in images]
            metrics = (await client.get("/metrics")).text
            return [a.json() for a in answers], [len(b) for b in created["weave"].batches], metrics

    batched, batch_sizes, metrics = asyncio.run(scenario(
        make_settings(bundle_dir, max_batch_size=8, max_queue_delay_ms=300), concurrent=True))
    alone, alone_sizes, _ = asyncio.run(scenario(make_settings(bundle_dir, max_batch_size=1), concurrent=False))
    assert sum(batch_sizes) == 8 and max(batch_sizes) > 1, batch_sizes
    assert alone_sizes == [1] * 8
    histogram = {s.name: s.value for f in text_string_to_metric_families(metrics) if f.name == "diffad_batch_size"
                 for s in f.samples if s.labels.get("model") == "weave"}
    assert histogram["diffad_batch_size_count"] == len(batch_sizes)
    assert histogram["diffad_batch_size_sum"] == 8
    for together, single in zip(batched, alone, strict=True):
        assert together["image_score"] == pytest.approx(single["image_score"], abs=1e-6)
        a = np.asarray(decode_map(together["anomaly_map"]), int)
        b = np.asarray(decode_map(single["anomaly_map"]), int)
        assert np.abs(a - b).max() <= 1  # same map; 8-bit rounding of a last-digit difference at most


def test_full_queue_answers_429_with_retry_after(bundle_dir):
    created: dict = {}

    async def scenario():
        settings = make_settings(bundle_dir, max_batch_size=1, max_queue_size=2)
        async with serving(settings, wrapping_factory(created)) as (app, client):
            backend = created["weave"]
            backend.gate, backend.entered = threading.Event(), threading.Event()
            running = asyncio.create_task(client.post("/inspect", files=upload(solid_image(10))))
            await until(backend.entered.is_set)  # the worker holds the first request
            batcher = app.state.registry.models["weave"].batcher
            queued = [asyncio.create_task(client.post("/inspect", files=upload(solid_image(v)))) for v in (20, 30)]
            await until(lambda: batcher.depth == 2)
            refused = await client.post("/inspect", files=upload(solid_image(40)))
            backend.gate.set()
            done = await asyncio.gather(running, *queued)
            after = await client.post("/inspect", files=upload(solid_image(50)))
            return refused, done, after

    refused, done, after = asyncio.run(scenario())
    assert refused.status_code == 429
    assert "queue" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert [r.status_code for r in done] == [200, 200, 200]
    assert after.status_code == 200


def test_uploads_being_decoded_hold_places_and_a_full_queue_refuses_before_reading(bundle_dir, monkeypatch):
    from diffad.service import routes

    decoding_may_finish, decoded = threading.Event(), []

    def held_decode(data, *args):  # decoding stalls until released: both first uploads sit in it
        decoded.append(len(data))
        decoding_may_finish.wait(timeout=30)
        return decode_image(data, *args)

    monkeypatch.setattr(routes, "decode_image", held_decode)
    seen_bodies = []

    async def scenario():
        settings = make_settings(bundle_dir, max_queue_size=2, max_concurrent_decodes=4)
        async with serving(settings) as (app, client):
            batcher = app.state.registry.models["weave"].batcher
            first = [asyncio.create_task(client.post("/inspect", files=upload(solid_image(v)))) for v in (10, 20)]
            await until(lambda: len(decoded) == 2)
            assert batcher.decoding == 2 and batcher.depth == 2  # nothing queued yet, and yet full
            metrics = (await client.get("/metrics")).text

            refused = await client.post("/inspect", files=upload(solid_image(30)))  # small: read, dropped

            async def body_chunks():  # tells whether the service read any of the refused upload
                seen_bodies.append("started")
                yield b"--x\r\nContent-Disposition: form-data; name=file; filename=p.png\r\n\r\n"
                yield solid_image(30) + b"\r\n--x--\r\n"

            unread = await client.post("/inspect", content=body_chunks(),  # no length: left unread, closed
                                       headers={"Content-Type": "multipart/form-data; boundary=x"})
            decoding_may_finish.set()
            answers = await asyncio.gather(*first)
            return refused, unread, answers, metrics, batcher.decoding

    refused, unread, answers, metrics, decoding_after = asyncio.run(scenario())
    assert refused.status_code == 429 and "queue limit (2)" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1 and "connection" not in refused.headers  # kept alive
    assert unread.status_code == 429 and unread.headers["Connection"] == "close"
    assert seen_bodies == [] and len(decoded) == 2  # neither refused upload was decoded; the second not read
    assert [a.status_code for a in answers] == [200, 200] and decoding_after == 0
    assert 'diffad_decoding_requests{model="weave"} 2.0' in metrics
    assert 'diffad_queue_depth{model="weave"} 2.0' in metrics


def test_timed_out_request_gets_504_and_is_never_computed(bundle_dir):
    created: dict = {}

    async def scenario():
        settings = make_settings(bundle_dir, max_batch_size=1, request_timeout_s=0.5)
        async with serving(settings, wrapping_factory(created)) as (_, client):
            backend = created["weave"]
            backend.batches.clear()
            backend.gate, backend.entered = threading.Event(), threading.Event()
            slow = asyncio.create_task(client.post("/inspect", files=upload(solid_image(10))))
            await until(backend.entered.is_set)
            waiting = await client.post("/inspect", files=upload(solid_image(20)))  # expires in the queue
            backend.gate.set()
            slow_answer = await slow
            backend.gate = None
            later = await client.post("/inspect", files=upload(solid_image(30)))
            return slow_answer, waiting, later, backend.computed_values()

    slow, waiting, later, computed = asyncio.run(scenario())
    assert waiting.status_code == 504 and "0.5 s" in waiting.json()["detail"]
    assert slow.status_code == 504  # started in time, but its answer came too late
    assert later.status_code == 200
    assert computed == [[10], [30]]  # 20 expired in the queue: dropped, not computed late


def test_request_whose_deadline_would_pass_in_its_batch_is_answered_at_once_and_never_computed():
    from concurrent.futures import ThreadPoolExecutor

    from diffad.service.batcher import DynamicBatcher, RequestTimeoutError, wait_for_result
    from diffad.service.metrics import ServiceMetrics

    computed = []

    def slow_backend(images):  # every batch takes 0.4 s: that is what the batcher learns
        computed.append(int(images[0, 0, 0, 0]))
        time.sleep(0.4)
        return np.zeros((len(images), 1, 2, 2), np.float32), np.zeros(len(images), np.float32)

    async def infer(batcher, value, seconds):  # an image whose first pixel is `value`, with seconds to live
        deadline = time.monotonic() + seconds
        return await wait_for_result(batcher.submit(np.full((1, 2, 2), value, np.uint8), deadline), deadline)

    async def scenario():
        metrics = ServiceMetrics()
        batcher = DynamicBatcher("weave", slow_backend, ThreadPoolExecutor(1), 1, 0.0, 8, metrics)
        batcher.start()
        await infer(batcher, 1, 10)  # a batch of 0.4 s
        running = asyncio.ensure_future(infer(batcher, 2, 10))
        await until(lambda: len(computed) == 2)  # the batch of 2 is computing
        # 0.6 s to live, about 0.4 s of it spent waiting for the batch of 2: some 0.2 s left when its own forms
        with pytest.raises(RequestTimeoutError, match="would pass before its batch finished"):
            await infer(batcher, 3, 0.6)
        await running
        await infer(batcher, 4, 10)
        await batcher.close()
        return metrics.deadline_dropped.labels("weave")._value.get()

    dropped = asyncio.run(scenario())
    assert computed == [1, 2, 4]  # 3 was refused when its batch was formed, not computed for nobody
    assert dropped == 1


def test_cancelled_request_leaves_no_work_behind(bundle_dir):
    created: dict = {}

    async def scenario():
        settings = make_settings(bundle_dir, max_batch_size=4, max_queue_delay_ms=0)
        async with serving(settings, wrapping_factory(created)) as (app, client):
            backend = created["weave"]
            backend.batches.clear()
            backend.gate, backend.entered = threading.Event(), threading.Event()
            first = asyncio.create_task(client.post("/inspect", files=upload(solid_image(10))))
            await until(backend.entered.is_set)
            batcher = app.state.registry.models["weave"].batcher
            abandoned = asyncio.create_task(client.post("/inspect", files=upload(solid_image(20))))
            kept = asyncio.create_task(client.post("/inspect", files=upload(solid_image(30))))
            await until(lambda: batcher.depth == 2)
            abandoned.cancel()  # the client goes away while its request is queued
            backend.gate.set()
            answers = await asyncio.gather(first, kept)
            metrics = (await client.get("/metrics")).text
            return answers, backend.computed_values(), abandoned.cancelled(), metrics

    answers, computed, cancelled, metrics = asyncio.run(scenario())
    assert cancelled and [a.status_code for a in answers] == [200, 200]
    assert computed == [[10], [30]]
    assert 'diffad_requests_total{model="weave",status="499"} 1.0' in metrics


def test_backend_failure_fails_its_batch_only(bundle_dir):
    created: dict = {}

    async def scenario():
        async with serving(make_settings(bundle_dir, max_batch_size=1), wrapping_factory(created)) as (_, client):
            created["weave"].fail_on_value = 13
            failed = await client.post("/inspect", files=upload(solid_image(13)))
            fine = await client.post("/inspect", files=upload(solid_image(14)))
            return failed, fine

    failed, fine = asyncio.run(scenario())
    assert failed.status_code == 500 and failed.json()["detail"] == "inference failed: RuntimeError"
    assert fine.status_code == 200


# --- bad input -----------------------------------------------------------------------------------
def test_each_bad_input_gets_its_code_and_the_service_keeps_answering(bundle_dir):
    good = encode(noise_image(40, 40))
    big_noise = encode(noise_image(200, 200, seed=7))  # about 120 kB of incompressible PNG
    gif = encode(Image.new("RGB", (8, 8)), "GIF")
    settings = make_settings(bundle_dir, max_upload_bytes=60_000, max_image_pixels=1_000_000)
    requests = [  # (expected status, what to send)
        (400, {"files": upload(b"definitely not an image")}),
        (400, {"files": upload(good[: len(good) * 2 // 3])}),  # truncated
        (400, {"files": upload(b"")}),
        (413, {"files": upload(big_noise)}),  # over the upload limit, within multipart slack
        (413, {"files": upload(big_noise * 2)}),  # over it by more than the slack: refused from Content-Length
        (413, {"files": upload(png_header(1200, 1000))}),  # 1.2 Mpx claimed in 100 bytes: over our limit
        (413, {"files": upload(png_header(100_000, 100_000))}),  # over Pillow's own bomb limit too
        (415, {"files": upload(good, "text/plain", "part.txt")}),
        (415, {"files": upload(gif, "application/octet-stream", "part.gif")}),
        (422, {"files": upload(good), "params": {"map": "jpeg"}}),
        (422, {"files": upload(good), "params": {"threshold": "abc"}}),
        (422, {"files": upload(good), "params": {"threshold": "nan"}}),
        (422, {"files": upload(good), "params": {"threshold": "-1"}}),  # scores lie in [0, 1]
        (422, {"files": upload(good), "params": {"threshold": "1.5"}}),
        (422, {"data": {"not_file": "x"}}),
        (400, {"files": {"file": ("x" * 10_000 + ".png", good, "image/png")}}),  # a part header past the limit
        (404, {"files": upload(good), "params": {"model": "nope\nINFO forged log line"}}),
    ]

    async def scenario():
        async with serving(settings) as (_, client):
            answers = []
            for _, kwargs in requests:
                answers.append(await client.post("/inspect", **kwargs))
            answers.append(await client.post("/inspect", files=upload(good)))
            return answers, (await client.get("/metrics")).text

    answers, metrics = asyncio.run(scenario())
    for (expected, kwargs), response in zip(requests, answers, strict=False):
        assert response.status_code == expected, (kwargs.get("params"), response.text)
        assert "detail" in response.json()
    assert answers[-1].status_code == 200
    limit = settings.max_image_pixels  # the service's own limit and words, also where Pillow's trips first
    assert answers[5].json()["detail"] == f"image of 1200x1000 pixels exceeds the limit of {limit} pixels"
    assert answers[6].json()["detail"].startswith(f"image exceeds the limit of {limit} pixels")
    assert "send the image as the form field 'file'" in answers[-3].json()["detail"]  # not a bare parser error
    counts = {(s.labels["model"], s.labels["status"]): s.value for f in text_string_to_metric_families(metrics)
              if f.name == "diffad_requests" for s in f.samples if s.name == "diffad_requests_total"}
    assert counts[("weave", "400")] == 4 and counts[("weave", "413")] == 4 and counts[("weave", "415")] == 2
    assert counts[("weave", "200")] == 1 and counts[("_unknown", "404")] == 1


# --- several models ------------------------------------------------------------------------------
def test_several_models_each_with_its_queue(bundle_dir, second_bundle_dir):
    image = encode(noise_image(40, 40))

    async def scenario():
        async with serving(make_settings(bundle_dir, models=[bundle_dir, second_bundle_dir])) as (app, client):
            # /readyz is 200 once one model serves: wait for the second as well before listing them
            await until(lambda: all(m.ready for m in app.state.registry.models.values()))
            listing = (await client.get("/models")).json()
            unnamed = await client.post("/inspect", files=upload(image))
            answers = [await client.post("/inspect", params={"model": m}, files=upload(image))
                       for m in ("weave", "grid")]
            batchers = {name: m.batcher for name, m in app.state.registry.models.items()}
            return listing, unnamed, answers, batchers

    listing, unnamed, answers, batchers = asyncio.run(scenario())
    assert [(m["name"], m["input_size"], m["channels"], m["threshold"], m["backend"]) for m in listing["models"]] == [
        ("weave", 32, 3, 0.42, "onnxruntime-cpu"), ("grid", 32, 3, 0.42, "onnxruntime-cpu")]
    assert unnamed.status_code == 422 and "grid" in unnamed.json()["detail"]
    assert [a.json()["model"] for a in answers] == ["weave", "grid"]
    assert answers[0].json()["image_score"] == answers[1].json()["image_score"]
    assert batchers["weave"] is not batchers["grid"]


def test_two_bundles_with_one_name_stop_the_service(bundle_dir, tmp_path):
    twin = shutil.copytree(bundle_dir, tmp_path / "twin")
    with pytest.raises(BundleError, match="two bundles are named 'weave'"):
        create_app(make_settings(bundle_dir, models=[bundle_dir, twin]))
    with pytest.raises(BundleError, match="not found"):
        create_app(make_settings(bundle_dir, models=[tmp_path / "missing"]))


# --- health, readiness, shutdown -----------------------------------------------------------------
def test_ready_only_after_warm_up_and_unready_when_draining(bundle_dir):
    opened = threading.Event()

    def slow_factory(bundle, settings):
        opened.wait(timeout=30)  # loading takes as long as the test says
        return open_backend(bundle, settings)

    async def scenario():
        async with serving(make_settings(bundle_dir), slow_factory, wait_ready=False) as (app, client):
            alive = await client.get("/healthz")
            before = await client.get("/readyz")
            early = await client.post("/inspect", files=upload(solid_image(10)))
            metrics_before = (await client.get("/metrics")).text
            opened.set()
            await until_ready(client)
            after = await client.get("/readyz")
            metrics_after = (await client.get("/metrics")).text
            app.state.registry.begin_drain()  # what SIGTERM does first
            draining = await client.get("/readyz")
            refused = await client.post("/inspect", files=upload(solid_image(10)))
            return alive, before, early, after, draining, refused, metrics_before, metrics_after

    alive, before, early, after, draining, refused, metrics_before, metrics_after = asyncio.run(scenario())
    assert alive.status_code == 200 and alive.json() == {"status": "alive"}
    assert before.status_code == 503
    assert before.json()["detail"]["models"]["weave"]["state"] == "loading"
    assert early.status_code == 503 and "Retry-After" in early.headers
    assert 'diffad_model_ready{model="weave"} 0.0' in metrics_before
    assert after.status_code == 200 and after.json()["models"]["weave"] == {"state": "ready"}
    assert 'diffad_model_ready{model="weave"} 1.0' in metrics_after
    assert draining.status_code == 503 and draining.json()["detail"]["draining"] is True
    assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]


def test_a_model_that_fails_to_load_keeps_the_service_unready(bundle_dir):
    def broken_factory(bundle, settings):
        raise RuntimeError("no such device")

    async def scenario():
        async with serving(make_settings(bundle_dir), broken_factory, wait_ready=False) as (app, client):
            await until(lambda: app.state.registry.models["weave"].state == "failed")
            return await client.get("/readyz"), await client.get("/healthz")

    ready, alive = asyncio.run(scenario())
    assert ready.status_code == 503
    assert ready.json()["detail"]["models"]["weave"] == {"state": "failed", "error": "RuntimeError: no such device"}
    assert alive.status_code == 200


def test_shutdown_answers_queued_requests(bundle_dir):
    """Lifespan shutdown drains: requests already queued are answered, not dropped."""
    created: dict = {}

    async def scenario():
        settings = make_settings(bundle_dir, max_batch_size=8, max_queue_delay_ms=3000)
        app = create_app(settings, wrapping_factory(created))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            async with app.router.lifespan_context(app):
                await until_ready(client)
                batcher = app.state.registry.models["weave"].batcher
                pending = [asyncio.create_task(client.post("/inspect", files=upload(solid_image(v))))
                           for v in (10, 20, 30)]
                await until(lambda: batcher.depth - batcher.decoding == 3)  # queued, waiting for the batch to fill
            return await asyncio.gather(*pending)  # the lifespan has exited: drained

    answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200, 200, 200]


# --- security ------------------------------------------------------------------------------------
def test_api_keys_guard_the_api_but_not_health_metrics_or_the_page(bundle_dir):
    image = encode(noise_image(40, 40))

    async def scenario():
        async with serving(make_settings(bundle_dir, api_keys="key-one, key-two")) as (_, client):
            results = {
                "inspect without": await client.post("/inspect", files=upload(image)),
                "inspect wrong": await client.post("/inspect", files=upload(image), headers={"X-API-Key": "key"}),
                "inspect right": await client.post("/inspect", files=upload(image), headers={"X-API-Key": "key-two"}),
                "models without": await client.get("/models"),
                "models right": await client.get("/models", headers={"X-API-Key": "key-one"}),
                "openapi without": await client.get("/openapi.json"),
            }
            for path in ("/healthz", "/readyz", "/metrics", "/"):
                results[path] = await client.get(path)
            return results

    r = asyncio.run(scenario())
    for name in ("inspect without", "inspect wrong", "models without"):
        assert r[name].status_code == 401, name
        assert r[name].json()["detail"].startswith("missing or invalid X-API-Key")
    assert r["inspect right"].status_code == 200 and r["models right"].status_code == 200
    assert r["openapi without"].status_code == 404  # with keys set there is no schema at all
    for path in ("/healthz", "/readyz", "/metrics", "/"):
        assert r[path].status_code == 200, path
    assert r["/"].headers["content-type"].startswith("text/html")
    page = r["/"].text
    assert "<script>" in page and "fetch(\"/inspect?" in page
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)  # self-contained: nothing from elsewhere


def test_metrics_exposition_has_the_contract_names(bundle_dir):
    async def scenario():
        async with serving(make_settings(bundle_dir)) as (_, client):
            await client.post("/inspect", files=upload(encode(noise_image(40, 40))))
            response = await client.get("/metrics")
            return response

    response = asyncio.run(scenario())
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    expected = {"diffad_requests": "counter", "diffad_request_duration_seconds": "histogram",
                "diffad_queue_duration_seconds": "histogram", "diffad_inference_duration_seconds": "histogram",
                "diffad_batch_size": "histogram", "diffad_queue_depth": "gauge", "diffad_model_ready": "gauge"}
    for name, kind in expected.items():
        assert name in families and families[name].type == kind, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("diffad_requests_total", (("model", "weave"), ("status", "200")))] == 1
    assert samples[("diffad_model_ready", (("model", "weave"),))] == 1
    assert samples[("diffad_queue_depth", (("model", "weave"),))] == 0
    bounds = {s.labels["le"] for s in families["diffad_request_duration_seconds"].samples if "le" in s.labels}
    assert {"0.001", "10.0", "+Inf"} <= bounds
    assert samples[("diffad_inference_duration_seconds_count", (("model", "weave"),))] == 1


# --- health: readiness per model, reopening, a dead worker, the backend's identity -----------------
def metric_samples(text: str, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_readiness_is_per_model_and_a_failed_load_is_tried_again(bundle_dir, second_bundle_dir):
    tries: dict[str, int] = {}

    def grid_fails_once(bundle, settings):
        tries[bundle.name] = tries.get(bundle.name, 0) + 1
        if bundle.name == "grid" and tries["grid"] == 1:
            raise RuntimeError("cannot open /secret/models/grid/model.onnx")
        return open_backend(bundle, settings)

    async def scenario():
        settings = make_settings(bundle_dir, models=[bundle_dir, second_bundle_dir])
        async with serving(settings, grid_fails_once, wait_ready=False) as (app, client):
            registry = app.state.registry
            await until(lambda: registry.models["weave"].ready and registry.models["grid"].state == "failed")
            overall, grid, unknown = (await client.get("/readyz"), await client.get("/readyz?model=grid"),
                                      await client.get("/readyz?model=nope"))
            served = await client.post("/inspect", params={"model": "weave"}, files=upload(solid_image(10)))
            refused = await client.post("/inspect", params={"model": "grid"}, files=upload(solid_image(10)))
            await until(lambda: registry.models["grid"].ready, timeout_s=20)  # tried again after 1 s
            later = await client.get("/readyz?model=grid")
            metrics = (await client.get("/metrics")).text
            return overall, grid, unknown, served, refused, later, metrics

    overall, grid, unknown, served, refused, later, metrics = asyncio.run(scenario())
    assert overall.status_code == 200  # one model serves: traffic may come
    assert overall.json()["models"]["weave"] == {"state": "ready"}
    # the error, without the path: no API key configured, so nobody reads it whole
    assert overall.json()["models"]["grid"] == {"state": "failed", "error": "RuntimeError: cannot open <path>"}
    assert grid.status_code == 503 and list(grid.json()["detail"]["models"]) == ["grid"]
    assert unknown.status_code == 404
    assert served.status_code == 200
    assert refused.status_code == 503 and "failed" in refused.json()["detail"]
    assert later.status_code == 200 and tries["grid"] == 2
    ready = metric_samples(metrics, "diffad_model_ready")
    assert ready[(("model", "grid"),)] == 1.0 and ready[(("model", "weave"),)] == 1.0


def test_a_model_whose_backend_keeps_failing_turns_unready_and_is_opened_again(bundle_dir):
    created: dict = {}
    opened = []

    def factory(bundle, settings):
        opened.append(bundle.name)
        return wrapping_factory(created)(bundle, settings)

    async def scenario():
        settings = make_settings(bundle_dir, max_batch_size=1, unhealthy_after_failures=2)
        async with serving(settings, factory) as (app, client):
            created["weave"].fail_on_value = 13  # a sticky fault: every batch with it fails
            first = await client.post("/inspect", files=upload(solid_image(13)))
            after_one = app.state.registry.models["weave"].state
            second = await client.post("/inspect", files=upload(solid_image(13)))
            after_two = app.state.registry.models["weave"].state
            await until_ready(client)  # reopened: a fresh backend, without the fault
            fine = await client.post("/inspect", files=upload(solid_image(13)))
            return first, after_one, second, after_two, fine

    first, after_one, second, after_two, fine = asyncio.run(scenario())
    assert [first.status_code, second.status_code] == [500, 500]
    assert after_one == "ready" and after_two == "reloading"  # two failures in a row: unready
    assert opened == ["weave", "weave"] and fine.status_code == 200


def test_a_dead_batcher_worker_fails_what_it_held_and_is_replaced(bundle_dir):
    async def scenario():
        async with serving(make_settings(bundle_dir, max_batch_size=4, max_queue_delay_ms=0)) as (app, client):
            batcher = app.state.registry.models["weave"].batcher
            queue, real = batcher._queue, batcher._queue.get_nowait
            calls = []

            def broken_once():  # a bug while a batch is being formed kills the worker task
                calls.append(1)  # call 1 is Queue.get's own, taking the request; 2 looks for more to batch
                if len(calls) == 2:
                    raise RuntimeError("bug while forming a batch")
                return real()

            queue.get_nowait = broken_once
            held = await client.post("/inspect", files=upload(solid_image(10)))
            after = await client.post("/inspect", files=upload(solid_image(20)))
            return held, after, batcher.worker_restarts

    held, after, restarts = asyncio.run(scenario())
    assert held.status_code == 500 and held.json()["detail"] == "internal error while batching"  # not a 504
    assert after.status_code == 200 and restarts == 1


def test_readyz_shows_error_paths_only_to_key_holders(bundle_dir):
    def broken(bundle, settings):
        raise RuntimeError("cannot open /secret/models/weave/model.onnx")

    async def scenario():
        settings = make_settings(bundle_dir, api_keys=["k1"])
        async with serving(settings, broken, wait_ready=False) as (app, client):
            await until(lambda: app.state.registry.models["weave"].state == "failed")
            return await client.get("/readyz"), await client.get("/readyz", headers={"X-API-Key": "k1"})

    anonymous, keyed = asyncio.run(scenario())
    assert anonymous.json()["detail"]["models"]["weave"]["error"] == "RuntimeError: cannot open <path>"
    assert keyed.json()["detail"]["models"]["weave"]["error"] == (
        "RuntimeError: cannot open /secret/models/weave/model.onnx")


def test_backend_info_names_what_serves_and_a_loud_fallback(bundle_dir, monkeypatch, caplog):
    from diffad.service import backends

    async def scenario():
        async with serving(make_settings(bundle_dir, backend="auto")) as (_, client):
            return (await client.get("/metrics")).text

    plain = metric_samples(asyncio.run(scenario()), "diffad_backend_info")
    assert plain == {(("backend", "onnxruntime-cpu"), ("device", "cpu"), ("fallback", "false"), ("model", "weave"),
                      ("precision", "fp32")): 1.0}

    def broken_engine(bundle, choice):
        raise RuntimeError("engine built for another GPU")

    monkeypatch.setattr(backends, "find_engine",
                        lambda bundle, cache: (backends.EngineChoice(".", {"file": "x.plan"}, "bundle"), "found"))
    monkeypatch.setattr(backends, "TensorRTBackend", broken_engine)
    fallen = metric_samples(asyncio.run(scenario()), "diffad_backend_info")
    assert [dict(k)["fallback"] for k in fallen] == ["true"]
    assert ("FALLBACK: the TensorRT engine x.plan failed to load: RuntimeError: engine built for another GPU"
            in caplog.text)
