"""`diffad bench overload`: the service when more arrives than it can compute, with large images, and stopped.

Phases, each on a fresh `diffad serve` subprocess (so that its peak memory is the phase's own):

1. capacity: closed loop, `--concurrency` clients, `--seconds`: the images/s the service sustains;
2. open-loop arrivals at 1x, 2x and 5x that capacity (`--multiples`) with the server's request timeout
   (`--timeout-s`): goodput (answers 200 per second), 429 and 504 counts and their latencies, images the
   backend computed that nobody received (from diffad_batch_size), and the server's peak resident memory;
3. large images: `--large-concurrency` clients sending a `--large-side` px PNG with its full-size map, the
   server at its default request timeout (30 s; `--large-timeout-s`): every request answered, and the peak
   resident memory;
4. SIGTERM under load: arrivals at 1x; the server gets SIGTERM halfway and the clients stop sending when
   its grace ends (a load balancer that watched /readyz has gone by then); answered (200), refused (503)
   and lost (connection errors) requests are counted.

Client and server share the machine: compare the phases with each other, not with another machine.

    diffad bench overload bundles/dagm --seconds 10 --json bench/results/cpu_small_overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import signal
import sys
import time
from collections import Counter, defaultdict

import numpy as np

from .load import (
    ServerProcess,
    add_server_arguments,
    drive,
    gateway_flags,
    generated_png,
    percentiles_ms,
    server_counters,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    p.add_argument("--concurrency", type=int, default=16, help="clients of the capacity phase (default 16)")
    p.add_argument("--multiples", default="1,2,5", help="arrival rates as multiples of capacity (default 1,2,5)")
    p.add_argument("--timeout-s", type=float, default=2.0, help="the server's DIFFAD_REQUEST_TIMEOUT_S (default 2)")
    p.add_argument("--max-queue-size", type=int, default=16, help="the server's queue bound (default 16)")
    p.add_argument("--max-batch-size", type=int, default=8, help="default 8")
    p.add_argument("--threads", type=int, help="backend intra-op threads")
    p.add_argument("--large-side", type=int, default=4000, help="side of the large-image phase's PNG (default 4000)")
    p.add_argument("--large-concurrency", type=int, default=8, help="its clients (default 8)")
    p.add_argument("--large-timeout-s", type=float, default=30.0,
                   help="the server's request timeout in the large-image phase (default 30, the service's own)")
    p.add_argument("--drain-grace-s", type=float, default=2.0, help="the server's grace after SIGTERM (default 2)")
    p.add_argument("--json", metavar="FILE", help="also write the result to FILE")


def run(args) -> int:
    from ..export.bundle import load_bundle
    from ..export.triton import resolve_bundle_dir
    from .throughput import emit, machine

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of the benchmark's own
    multiples = [float(m) for m in args.multiples.split(",") if m.strip()]
    if (args.seconds <= 0 or args.concurrency < 1 or not multiples or min(multiples) <= 0
            or args.large_side < 1 or args.large_concurrency < 1):
        raise ValueError("--seconds, --concurrency, --multiples, --large-side and --large-concurrency must be positive")
    bundle = load_bundle(resolve_bundle_dir(args.bundle))
    payload = generated_png(bundle.input.size, bundle.input.channels)

    def server(**extra) -> ServerProcess:
        flags = ["--request-timeout-s", str(args.timeout_s), "--drain-grace-s", str(args.drain_grace_s),
                 *gateway_flags(args.backend, args.triton_url)]
        for name, value in extra.items():
            flags += [f"--{name.replace('_', '-')}", str(value)]
        return ServerProcess(args.bundle, args.backend, args.max_batch_size, 5.0, args.concurrency, args.threads,
                             max_queue_size=args.max_queue_size, extra_flags=flags)

    phases = {}
    with server() as s:
        capacity = asyncio.run(drive(s.url, payload, args.concurrency, args.seconds, None, "png"))
        capacity["peak_rss_mib"] = s.peak_rss_mib()
    phases["capacity"] = capacity
    rate = capacity["throughput_img_s"]
    print(json.dumps({"capacity_img_s": rate}), file=sys.stderr, flush=True)
    for multiple in multiples:
        with server() as s:
            result = asyncio.run(open_loop(s, payload, multiple * rate, args.seconds))
        phases[f"{multiple:g}x"] = {"multiple": multiple, **result}
        print(json.dumps({f"{multiple:g}x": summary_line(result)}), file=sys.stderr, flush=True)
    large = large_png(args.large_side, bundle.input.channels)
    with server(request_timeout_s=args.large_timeout_s) as s:  # flags given last win
        result = asyncio.run(drive(s.url, large, args.large_concurrency, args.seconds, None, "png",
                                   warmup_requests=0))
        result["peak_rss_mib"] = s.peak_rss_mib()
    phases["large_images"] = {"side": args.large_side, "png_bytes": len(large), "concurrency": args.large_concurrency,
                              "request_timeout_s": args.large_timeout_s, **result}
    with server() as s:
        phases["sigterm"] = asyncio.run(open_loop(s, payload, rate, args.seconds, sigterm_after_s=args.seconds / 2,
                                                  stop_sending_after_s=args.seconds / 2 + args.drain_grace_s))
    out = {"benchmark": "overload", "command": getattr(args, "command", None), "model": bundle.name,
           "bundle": str(args.bundle), "backend": args.backend,
           "client": "open-loop phases: aiohttp, upload encoded once; capacity and large images: httpx (bench load's)",
           "input": [bundle.input.channels, bundle.input.size, bundle.input.size],
           "server": {"request_timeout_s": args.timeout_s, "max_queue_size": args.max_queue_size,
                      "max_batch_size": args.max_batch_size, "drain_grace_s": args.drain_grace_s},
           "seconds_per_phase": args.seconds, "capacity_img_s": rate, "phases": phases, "machine": machine()}
    print(markdown_table(out), file=sys.stderr)
    emit(out, args.json)
    return 0


def large_png(side: int, channels: int) -> bytes:
    """A side x side PNG of smooth texture (compresses well, decodes to side^2 x channels bytes)."""
    from PIL import Image

    yy, xx = np.mgrid[0:side, 0:side]
    plane = ((np.sin(xx / 37.0) + np.cos(yy / 23.0)) * 60 + 128).astype(np.uint8)
    pixels = plane if channels == 1 else np.stack([plane, plane[::-1], plane[:, ::-1]], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=6)  # 7000 px: 18.9 MB, under the upload limit
    return buffer.getvalue()


def multipart_upload(payload: bytes) -> tuple[bytes, str]:
    """The /inspect upload of `payload` as multipart bytes and its content type, encoded once."""
    import httpx

    request = httpx.Request("POST", "http://upload/", files={"file": ("bench.png", payload, "image/png")})
    return request.read(), request.headers["content-type"]


async def open_loop(server: ServerProcess, payload: bytes, rate: float, seconds: float,
                    sigterm_after_s: float | None = None, stop_sending_after_s: float | None = None) -> dict:
    """Requests sent at `rate` per second for `seconds` regardless of answers (as a line camera sends them).

    The client shares the machine with the server, so it must cost little: aiohttp with the upload encoded
    once takes about 0.2 ms of CPU a request here, httpx with its multipart encoding about 2.6 ms, which at 5x
    capacity took a tenth of this 2-core machine from the server."""
    import aiohttp
    import httpx

    statuses: Counter = Counter()
    latencies: dict[str, list[float]] = defaultdict(list)
    body, content_type = multipart_upload(payload)
    connector = aiohttp.TCPConnector(limit=2048)
    async with (aiohttp.ClientSession(server.url, connector=connector, timeout=aiohttp.ClientTimeout(total=60.0),
                                      headers={"Content-Type": content_type}) as session,
                httpx.AsyncClient(base_url=server.url, timeout=60.0) as control):
        before = await server_counters(control)

        async def one() -> None:
            started = time.perf_counter()
            try:
                async with session.post("/inspect", params={"map": "png"}, data=body) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                statuses[type(e).__name__] += 1
                return
            statuses[str(status)] += 1
            latencies[str(status)].append(time.perf_counter() - started)

        server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
        tasks, started, sent = [], time.perf_counter(), 0
        signalled, peak = False, None
        end = min(seconds, stop_sending_after_s or seconds)
        while (now := time.perf_counter() - started) < end:
            if sigterm_after_s is not None and not signalled and now >= sigterm_after_s:
                peak = server.peak_rss_mib()  # read while the process still exists
                server.process.send_signal(signal.SIGTERM)
                signalled = True
            while sent < rate * now:
                tasks.append(asyncio.create_task(one()))
                sent += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu
        server_cpu = None if server_cpu is None or signalled else server.cpu_seconds() - server_cpu
        after = None if sigterm_after_s is not None else await server_counters(control)
    peak = server.peak_rss_mib() if not signalled else peak
    result = {"offered_img_s": round(rate, 2), "sent": sent, "seconds": round(elapsed, 3),
              "statuses": dict(statuses), "goodput_img_s": round(statuses["200"] / elapsed, 2),
              "latency_ms": {status: percentiles_ms(values) for status, values in sorted(latencies.items())},
              "peak_rss_mib": peak,
              # both share the machine: how much of it the load generator took from the server
              "cpu_s": {"client": round(client_cpu, 2),
                        "server": None if server_cpu is None else round(server_cpu, 2)}}
    if after is not None:
        computed = after.images - before.images
        result.update(computed_images=int(computed), computed_unanswered=int(computed - statuses["200"]))
    else:
        result.update(answered=statuses["200"], refused_503=statuses["503"],
                      lost=sum(v for k, v in statuses.items() if not k.isdigit()))
    return result


def summary_line(result: dict) -> str:
    s = result["statuses"]
    return (f"goodput {result['goodput_img_s']} img/s, 200: {s.get('200', 0)}, 429: {s.get('429', 0)}, "
            f"504: {s.get('504', 0)}, computed unanswered: {result.get('computed_unanswered')}")


def markdown_table(record: dict) -> str:
    """The README's overload table: one row per phase."""
    lines = ["| phase | offered img/s | goodput img/s | 200 | 429 | 504 | 503 | lost | 429 p50 / p95 ms "
             "| 200 p95 ms | computed, unanswered | peak RSS MiB |", "|" + "---|" * 12]
    for name, phase in record["phases"].items():
        s = phase.get("statuses", {})
        lat = phase.get("latency_ms", {})
        if "200" in lat or "429" in lat:  # open loop: latencies by status
            ok, refused = lat.get("200", {}), lat.get("429", {})
        else:  # closed loop: latencies of the 200s
            ok, refused = lat, {}
        offered = phase.get("offered_img_s", "closed loop")
        goodput = phase.get("goodput_img_s", phase.get("throughput_img_s"))
        lost = sum(v for k, v in s.items() if not k.isdigit())
        label = f"large {phase['side']} px" if name == "large_images" else name
        lines.append(f"| {label} | {offered} | {goodput} | {s.get('200', 0)} | {s.get('429', 0)} | "
                     f"{s.get('504', 0)} | {s.get('503', 0)} | {lost} | "
                     f"{refused.get('p50', '–')} / {refused.get('p95', '–')} | {ok.get('p95', '–')} | "
                     f"{phase.get('computed_unanswered', '–')} | {phase.get('peak_rss_mib', '–')} |")
    return "\n".join(lines)
