"""Deployment tests run real external tools (nginx, docker-compose, kubectl, Prometheus).

A missing tool skips its test on a developer's machine; CI sets LANNER_REQUIRE_DEPLOY_TOOLS=1 (see
.ci/run), which turns that skip into a failure so a broken install step can't hide behind a green run.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Return the path of executable `name`; skip the test if it is missing (fail in CI)."""
    sbin = (os.path.join(d, name) for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"))  # nginx is in sbin
    path = shutil.which(name) or next((p for p in sbin if os.access(p, os.X_OK)), None)
    if path is None:
        msg = f"{name} is not installed (see .ci/install-deploy-tools)"
        if os.environ.get("LANNER_REQUIRE_DEPLOY_TOOLS") == "1":
            pytest.fail(msg + "; LANNER_REQUIRE_DEPLOY_TOOLS=1 requires it", pytrace=False)
        pytest.skip(msg)
    return path
