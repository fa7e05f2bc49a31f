"""Container health check: exit 0 when Lanner answers GET <path> (default /health) with a 2xx.

The image has no curl, so the Dockerfile's HEALTHCHECK and docker-compose.yml run this with the image's
python: `python /usr/local/bin/lanner-healthcheck [/health|/ready]`. It asks the server in the same
container on LANNER_PORT (default 8000); an HTTP(S)_PROXY in the environment is ignored.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/health"
    host = os.environ.get("LANNER_HOST", "")
    if host in ("", "0.0.0.0", "::"):  # bound to every interface: ask over loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{os.environ.get('LANNER_PORT', '8000')}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4) as resp:
            return 0 if 200 <= resp.status < 300 else 1
    except Exception as exc:  # connection refused, timeout, HTTP 503 while loading/draining, ...
        print(f"lanner-healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
