#!/usr/bin/env python3
"""Container health check for the diffad service: exit 0 when GET /readyz answers 200, else 1.

    diffad-healthcheck [URL]

URL defaults to http://127.0.0.1:$DIFFAD_PORT/readyz (DIFFAD_PORT defaults to 8000); DIFFAD_HEALTHCHECK_URL
overrides it. /readyz answers 200 only once every model is loaded and warmed up, so a container is
"healthy" exactly when it can serve. Standard library only (both images have Python; the CUDA image has no
curl), and a 4 s timeout, under the image's 5 s HEALTHCHECK timeout.
"""

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    port = os.environ.get("DIFFAD_PORT") or "8000"
    url = argv[1] if len(argv) > 1 else os.environ.get("DIFFAD_HEALTHCHECK_URL") or f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("DIFFAD_HEALTHCHECK_TIMEOUT_S", "4"))) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        print(f"diffad-healthcheck: {url}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"diffad-healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
