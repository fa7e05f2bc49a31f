"""Security defaults of the app itself, in-process (no model needed): bind address, API keys from a file,
/metrics protection, CORS allowlist."""

from __future__ import annotations

import httpx
import pytest

from app.config import Settings, load_settings
from app.main import create_app


def client(**settings) -> httpx.AsyncClient:
    app = create_app(Settings(**settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lanner.test")


def test_binds_to_loopback_by_default(monkeypatch):
    monkeypatch.delenv("LANNER_HOST", raising=False)
    assert load_settings().host == "127.0.0.1"


async def test_keys_from_file_and_flag_all_work(tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team keys\nkey-from-file-1\n\n  key-from-file-2  \n")
    async with client(api_keys=["flag-key"], api_key_file=keyfile) as c:
        for key in ("flag-key", "key-from-file-1", "key-from-file-2"):
            assert (await c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        r = await c.get("/v1/models", headers={"Authorization": "Bearer # team keys"})
        assert r.status_code == 401 and r.json()["error"]["message"]
        assert (await c.get("/health")).status_code == 200  # liveness stays open


async def test_auth_is_decided_on_the_path_not_the_host():
    async with client(api_keys=["k"]) as c:
        # a Host header can't make a protected path look like an open one
        r = await c.get("/v1/models", headers={"Host": "evil.example/health"})
        assert r.status_code == 401


@pytest.mark.parametrize(("public", "status"), [(False, 401), (True, 200)])
async def test_metrics_protected_unless_public(public, status):
    async with client(api_keys=["k"], metrics_public=public) as c:
        assert (await c.get("/metrics")).status_code == status
        assert (await c.get("/metrics", headers={"Authorization": "Bearer k"})).status_code == 200


async def test_cors_off_by_default_and_allowlist_only():
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with client() as c:
        r = await c.options("/v1/completions", headers=pre)
        assert "access-control-allow-origin" not in r.headers
    async with client(cors_allow_origins=["https://app.example"], api_keys=["k"]) as c:
        r = await c.options("/v1/completions", headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = await c.options("/v1/completions", headers={**pre, "Origin": "https://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"
        r = await c.get("/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_empty_env_means_unset(monkeypatch):
    monkeypatch.setenv("LANNER_CACHE_DIR", "")
    monkeypatch.setenv("LANNER_PORT", "")
    s = load_settings()
    assert s.port == 8000 and str(s.cache_dir).endswith("lanner")


def test_cgroup_quota_bounds_threads(tmp_path):
    from app.engine.process import cgroup_cpu_limit

    f = tmp_path / "cpu.max"
    for text, want in (("max 100000", None), ("200000 100000", 2), ("150000 100000", 1), ("50000 100000", 1)):
        f.write_text(text + "\n")
        assert cgroup_cpu_limit(str(f)) == want
    assert cgroup_cpu_limit(str(tmp_path / "missing")) is None


def test_server_keeps_idle_connections_longer_than_clients(monkeypatch):
    """The server must not be the side that closes an idle keep-alive connection first: httpx (the OpenAI
    SDK's transport) expires idle connections after 5 s and nginx upstreams after 60 s; a server closing at
    the same moment a client reuses the connection loses that request (seen in the soak before this)."""
    from app.server import uvicorn_config

    monkeypatch.delenv("LANNER_KEEP_ALIVE_TIMEOUT", raising=False)
    settings = load_settings()
    config = uvicorn_config(create_app(settings), settings)
    assert config.timeout_keep_alive > max(httpx.Limits().keepalive_expiry, 60)
    monkeypatch.setenv("LANNER_KEEP_ALIVE_TIMEOUT", "120")
    assert uvicorn_config(create_app(settings), load_settings()).timeout_keep_alive == 120
