"""A reload under load: clients keep inspecting while the served bundle folder gets a new version and
POST /models/{name}/reload switches to it. Counts every answer by status and by version, per client.

    python bench/reload_check.py bundles/demo bundles/demo_v2 --seconds 20 --clients 8 \\
        --json bench/results/cpu_small_reload_under_load.json

OLD and NEW are two exports of the same model name (another training seed, say); OLD is copied to a scratch
folder which the server serves and whose files are replaced by NEW's halfway. Passes when no request fails
and each client sees the old version, then the new one, never back.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from diffad.benchmarks.load import ServerProcess, generated_png
from diffad.benchmarks.throughput import emit, machine
from diffad.export.bundle import load_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="the bundle served first")
    parser.add_argument("new", type=Path, help="the new version: a bundle of the same model name")
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration; the reload comes halfway")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import httpx

    old, new = load_bundle(args.old), load_bundle(args.new)
    if old.name != new.name or old.version == new.version:
        raise SystemExit(f"need two versions of one model: {old.name} {old.version}, {new.name} {new.version}")
    scratch = Path(tempfile.mkdtemp(prefix="diffad-reload-")) / old.name
    shutil.copytree(args.old, scratch)
    image = generated_png(old.input.size, old.input.channels)
    per_client: list[list[tuple[float, int, str | None]]] = [[] for _ in range(args.clients)]
    stop = threading.Event()
    with ServerProcess(str(scratch), "onnxruntime", max_batch_size=8, max_queue_delay_ms=5,
                       concurrency=args.clients, threads=None) as server:

        def client(answers):
            with httpx.Client(base_url=server.url, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/inspect?map=none", files={"file": ("part.png", image, "image/png")})
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    answers.append((time.monotonic(), r.status_code, version))

        threads = [threading.Thread(target=client, args=(answers,)) for answers in per_client]
        started = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(args.seconds / 2)
        for item in scratch.iterdir():
            item.unlink()
        for item in args.new.iterdir():
            shutil.copy(item, scratch / item.name)
        reload_started = time.monotonic()
        reload = httpx.post(f"{server.url}/models/{old.name}/reload", timeout=120)
        reload_s = time.monotonic() - reload_started
        time.sleep(max(0.0, started + args.seconds - time.monotonic()))
        stop.set()
        for t in threads:
            t.join()
    shutil.rmtree(scratch.parent, ignore_errors=True)

    answers = [a for answers in per_client for a in answers]
    statuses = Counter(str(status) for _, status, _ in answers)
    versions = Counter(version for _, status, version in answers if status == 200)
    monotonic = all(_one_switch([v for _, s, v in mine if s == 200], old.version, new.version) for mine in per_client)
    first_new = min((t for t, s, v in answers if v == new.version), default=None)
    result = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "model": old.name, "old_version": old.version, "new_version": new.version,
        "clients": args.clients, "seconds": args.seconds,
        "reload": {"status": reload.status_code, "body": reload.json(), "seconds": round(reload_s, 3)},
        "answers": len(answers), "by_status": dict(statuses),
        "by_version": {str(k): v for k, v in versions.items()},
        "failed": sum(n for s, n in statuses.items() if s != "200"),
        "each_client_switched_once": monotonic,
        "first_new_answer_after_reload_started_s": None if first_new is None else round(first_new - reload_started, 3),
    }
    emit(result, args.json)
    if result["failed"] or not monotonic or reload.status_code != 200:
        raise SystemExit(1)


def _one_switch(versions: list[str | None], old: str, new: str) -> bool:
    switch = versions.index(new) if new in versions else len(versions)
    return set(versions[:switch]) <= {old} and set(versions[switch:]) <= {new}


if __name__ == "__main__":
    main()
