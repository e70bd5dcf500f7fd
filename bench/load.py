"""`diffad bench load`: the inspection service under concurrent clients, with and without dynamic batching.

For each configuration (batching: max batch N and a queue delay; no batching: max batch 1) a fresh
`diffad serve` runs in a subprocess, and this process drives it with `--concurrency` HTTP clients
(httpx, asyncio) for `--seconds` or `--requests`, after a short warm-up. The same run also times the bare
backend in this process (no server running then) at the same batch sizes, so the service's overhead and
the batching gain read off one JSON object. Client and server share the machine: on a small CPU the
client's own cost is part of what is measured, so compare configurations, not absolute figures.

    diffad bench load bundles/dagm --concurrency 32 --seconds 20 --max-batch-size 8 --max-queue-delay-ms 5

The gateway: `--backend triton --triton-url URL` over a model folder of the Triton repository (made by
`diffad export-triton`; Triton already serving it), and `--compare-backend onnxruntime` to run the same
batching configuration in-process in the same run, for the ratio.

    diffad bench load triton-repo/dagm --backend triton --triton-url http://127.0.0.1:8000 \
        --compare-backend onnxruntime --concurrency 16 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The bundle and the backend of the server a benchmark starts."""
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    p.add_argument("--backend", default="onnxruntime", choices=("auto", "onnxruntime", "tensorrt", "torch", "triton"),
                   help="the server's backend (default onnxruntime)")
    p.add_argument("--triton-url", metavar="URL", help="with --backend triton: the Triton server the gateway uses")


def gateway_flags(backend: str, triton_url: str | None) -> list[str]:
    """`diffad serve` flags for the gateway (--backend triton), none for the others."""
    return ["--triton-url", triton_url] if backend == "triton" and triton_url else []


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p)
    p.add_argument("--concurrency", type=int, default=16, help="clients with a request in flight (default 16)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per configuration (default 10)")
    p.add_argument("--requests", type=int, help="measure this many requests per configuration instead")
    p.add_argument("--max-batch-size", type=int, default=8, help="batching configuration's max batch (default 8)")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0, help="its max queue delay (default 5)")
    p.add_argument("--threads", type=int, help="backend intra-op threads, server and bare alike")
    p.add_argument("--image", metavar="FILE", help="image to send (default: a generated PNG at the model's size)")
    p.add_argument("--map", choices=("png", "none"), default="png", help="ask for the anomaly map (default png)")
    p.add_argument("--bare-seconds", type=float,
                   help="time the bare backend this long per batch size (default: half of --seconds, 0.5 to 10)")
    p.add_argument("--compare-backend", choices=("auto", "onnxruntime", "tensorrt", "torch"),
                   help="also run the batching configuration with this backend, same clients, in this run")
    p.add_argument("--json", metavar="FILE", help="also write the result to FILE")


def run(args) -> int:
    from ..export.bundle import load_bundle
    from .throughput import emit, machine

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of the benchmark's own
    if args.concurrency < 1 or args.max_batch_size < 1 or (args.requests is not None and args.requests < 1):
        raise ValueError("--concurrency, --max-batch-size and --requests must be positive")
    from ..export.triton import resolve_bundle_dir

    if args.backend == "triton" and not args.triton_url:
        raise ValueError("--backend triton needs --triton-url")
    bundle = load_bundle(resolve_bundle_dir(args.bundle))
    payload = Path(args.image).read_bytes() if args.image else generated_png(bundle.input.size, bundle.input.channels)
    configurations = [("batching", args.backend, args.max_batch_size, args.max_queue_delay_ms),
                      ("no-batching", args.backend, 1, 0.0)]
    if args.compare_backend:
        configurations.append(("batching", args.compare_backend, args.max_batch_size, args.max_queue_delay_ms))
    runs = []
    for mode, backend, max_batch, delay_ms in configurations:
        with ServerProcess(args.bundle, backend, max_batch, delay_ms, args.concurrency, args.threads,
                           extra_flags=gateway_flags(backend, args.triton_url)) as server:
            result = asyncio.run(drive(server.url, payload, args.concurrency, args.seconds, args.requests, args.map))
            result["server_backend"] = server.backend
        runs.append({"mode": mode, "backend": backend, "max_batch_size": max_batch, "max_queue_delay_ms": delay_ms,
                     **result})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    bare = bare_backend_throughput(bundle, args.backend, sorted({args.max_batch_size, 1}, reverse=True),
                                   args.threads, seconds=args.bare_seconds or min(max(args.seconds / 2, 0.5), 10.0),
                                   triton_url=args.triton_url)
    batching, plain = runs[0]["throughput_img_s"], runs[1]["throughput_img_s"]
    out = {
        "benchmark": "load", "command": getattr(args, "command", None), "model": bundle.name,
        "bundle": str(args.bundle),
        "input": [bundle.input.channels, bundle.input.size, bundle.input.size], "backend": args.backend,
        "concurrency": args.concurrency, "measure": ({"requests": args.requests} if args.requests
                                                     else {"seconds": args.seconds}),
        "map": args.map, "image_bytes": len(payload), "client": "httpx.AsyncClient in the benchmark's process",
        "machine": machine(), "runs": runs, "bare_backend": bare,
        "batching_speedup": round(batching / plain, 3) if plain else None,
    }
    if args.compare_backend:
        other = runs[2]["throughput_img_s"]
        ratio = round(batching / other, 3) if other else None
        out["comparison"] = {"backend": args.compare_backend, "throughput_img_s": other,
                             f"{args.backend}_over_{args.compare_backend}": ratio}
        if args.backend == "triton":
            out["triton_url"] = args.triton_url
    emit(out, args.json)
    return 0


def generated_png(size: int, channels: int) -> bytes:
    from PIL import Image

    from ..export.parity import parity_images

    image = parity_images(size, channels, count=2)[1]  # a textured image with a defect
    pixels = image[0] if channels == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def percentiles_ms(latencies_s: list[float]) -> dict:
    if not latencies_s:
        return {}
    values = np.asarray(latencies_s) * 1e3
    return {"p50": round(float(np.percentile(values, 50)), 3), "p95": round(float(np.percentile(values, 95)), 3),
            "p99": round(float(np.percentile(values, 99)), 3), "mean": round(float(values.mean()), 3),
            "max": round(float(values.max()), 3)}


async def drive(url: str, payload: bytes, concurrency: int, seconds: float, requests: int | None,
                map_format: str = "png", warmup_requests: int | None = None) -> dict:
    """Keep `concurrency` requests in flight for `seconds` (or until `requests` are done)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as client:
        async def one() -> tuple[int, float]:
            started = time.perf_counter()
            response = await client.post("/inspect", params={"map": map_format},
                                         files={"file": ("bench.png", payload, "image/png")})
            return response.status_code, time.perf_counter() - started

        warmup = warmup_requests if warmup_requests is not None else 2 * concurrency
        for start in range(0, warmup, concurrency):  # connections opened, first batches run
            await asyncio.gather(*(one() for _ in range(min(concurrency, warmup - start))))

        before = await server_counters(client)
        statuses: Counter = Counter()
        latencies: list[float] = []
        tickets = iter(range(requests)) if requests else None
        stop_at = time.perf_counter() + seconds

        async def client_loop() -> None:
            while True:
                if tickets is not None:
                    if next(tickets, None) is None:
                        return
                elif time.perf_counter() >= stop_at:
                    return
                try:
                    status, elapsed = await one()
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1
                    continue
                statuses[str(status)] += 1
                if status == 200:
                    latencies.append(elapsed)

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = await server_counters(client)
    images, batches = after.images - before.images, after.batches - before.batches
    histogram_p95 = histogram_quantile(0.95, {le: count - before.request_buckets.get(le, 0.0)
                                              for le, count in after.request_buckets.items()})
    return {"requests": sum(statuses.values()), "ok": len(latencies), "statuses": dict(statuses),
            "seconds": round(elapsed, 3), "throughput_img_s": round(len(latencies) / elapsed, 2),
            "latency_ms": percentiles_ms(latencies),
            # what Prometheus' histogram_quantile(0.95, ...) reads from diffad_request_duration_seconds over
            # the same requests: the dashboard's and alerts' p95, beside the clients' own
            "histogram_p95_ms": None if histogram_p95 is None else round(histogram_p95 * 1e3, 3),
            "server_mean_batch_size": round(images / batches, 3) if batches else None}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds the q-th observation."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower  # as Prometheus: the highest finite bound
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


@dataclass(frozen=True)
class ServerCounters:
    """What the server has counted so far, from one scrape of its /metrics."""

    images: float   # computed, from diffad_batch_size's sum
    batches: float  # and its count
    request_buckets: dict[float, float]  # diffad_request_duration_seconds: upper bound -> cumulative count


async def server_counters(client) -> ServerCounters:
    from prometheus_client.parser import text_string_to_metric_families

    images = batches = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for sample in family.samples:
            if sample.name == "diffad_batch_size_sum":
                images += sample.value
            elif sample.name == "diffad_batch_size_count":
                batches += sample.value
            elif sample.name == "diffad_request_duration_seconds_bucket":  # summed over models
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return ServerCounters(images, batches, buckets)


def bare_backend_throughput(bundle, backend: str, batch_sizes: list[int], threads: int | None,
                            seconds: float, triton_url: str | None = None) -> list[dict]:
    """The backend the server would open, called directly on random batches: the ceiling for the service."""
    from ..service.backends import open_backend
    from ..service.settings import Settings
    from .throughput import random_images, summarise, time_batches

    settings = Settings(_env_file=None, models=[bundle.path], backend=backend, threads=threads, triton_url=triton_url)
    runner = open_backend(bundle, settings)
    rows = []
    try:
        for batch in batch_sizes:
            images = random_images(batch, bundle.input.channels, bundle.input.size)
            times = time_batches(lambda images=images: runner(images), seconds)
            rows.append({"backend": runner.name, **summarise(times, batch)})
    finally:
        runner.close()
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`diffad serve` in a subprocess on a free local port; waits for /readyz, SIGTERMs on exit."""

    def __init__(self, bundle: str, backend: str, max_batch_size: int, max_queue_delay_ms: float,
                 concurrency: int, threads: int | None, ready_timeout_s: float = 120.0,
                 max_queue_size: int | None = None, extra_flags: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "diffad.cli", "serve", str(bundle), "--host", "127.0.0.1",
                        "--port", str(self.port), "--backend", backend, "--max-batch-size", str(max_batch_size),
                        "--max-queue-delay-ms", str(max_queue_delay_ms),
                        "--max-queue-size", str(max_queue_size or max(256, 4 * concurrency)), "--log-level",
                        "warning", *(extra_flags or [])]
        if threads:
            self.command += ["--threads", str(threads)]
        self.ready_timeout_s = ready_timeout_s
        self.backend = None

    def __enter__(self) -> ServerProcess:
        import httpx

        # No API keys: the benchmark's own server. Other DIFFAD_ settings of the environment still apply.
        env = {**os.environ, "DIFFAD_API_KEYS": ""}
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self._log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server was not ready in {self.ready_timeout_s:.0f} s:\n{self._log_tail()}")
            time.sleep(0.2)
        models = httpx.get(self.url + "/models", timeout=5).json()["models"]
        self.backend = models[0]["backend"]
        return self

    def __exit__(self, *exc) -> bool:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return False

    def peak_rss_mib(self) -> float | None:
        """The server's peak resident memory so far (Linux: VmHWM), None where it cannot be read."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None

    def cpu_seconds(self) -> float | None:
        """CPU time the server has used so far (Linux: utime + stime), None where it cannot be read."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def _log_tail(self, limit: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]
