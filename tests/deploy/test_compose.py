"""docker-compose.yml, the Dockerfile and .dockerignore, checked without a Docker engine.

- `docker compose config` (v2, when the plugin works) and Debian's `docker-compose config` (1.29) both
  accept docker-compose.yml, with and without `--profile replicas`; the resolved config has the services,
  health checks, volumes and mounts the deployment relies on, and agrees with the files it mounts.
- The Dockerfile is checked statically (multi-stage, CPU torch pinned to pyproject's version, non-root,
  HEALTHCHECK, ...), and its builder stage is executed for real outside Docker (slow): its ARG/ENV/
  WORKDIR/COPY/RUN lines, with .dockerignore applied to the build context and image paths rooted in a
  temp dir, build the venv with docker/install.sh, then `lanner --version` runs from it.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
import yaml

from tests.deploy.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CACHE_IN_IMAGE = "/home/lanner/.cache/lanner"
LANNER_SERVICES = ("lanner", "lanner-1", "lanner-2")
REPLICA_SERVICES = ("lanner-1", "lanner-2", "nginx")


# --- docker compose config ----------------------------------------------------------------------------

def compose_commands() -> list[list[str]]:
    found = []
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


@pytest.fixture(params=["docker compose", "docker-compose"])
def compose(request) -> list[str]:
    """Each compose implementation that works here; docker-compose 1.29 is the one CI installs."""
    available = {" ".join(c): c for c in compose_commands()}
    if request.param not in available:
        if request.param == "docker-compose":
            require_tool("docker-compose")
        pytest.skip(f"`{request.param}` does not work here")
    return available[request.param]


def compose_env(**extra: str) -> dict[str, str]:
    """The caller's environment without LANNER_*/COMPOSE_* settings, so the resolution is the file's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANNER_", "COMPOSE_"))}
    return {**env, **extra}


def resolved_config(compose: list[str], *args: str, env: dict[str, str] | None = None) -> dict:
    r = subprocess.run([*compose, "-f", "docker-compose.yml", *args, "config"], cwd=ROOT, capture_output=True,
                       text=True, env=env or compose_env(), timeout=60)
    assert r.returncode == 0, f"{' '.join(compose)} {' '.join(args)} config failed:\n{r.stderr}"
    return yaml.safe_load(r.stdout)


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return env


def mounts(service: dict) -> dict[str, str]:
    """container path -> source (host path or volume name), for short and long volume syntax."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v["source"], v["target"]
        out[dst] = src
    return out


def read_settings_env_names() -> set[str]:
    """Every LANNER_* variable that `lanner serve` reads: its flags' env defaults and the Settings fields."""
    from app.config import Settings

    names = set(re.findall(r'env\("(LANNER_[A-Z0-9_]+)"\)', (ROOT / "app" / "cli.py").read_text()))
    for name, f in Settings.model_fields.items():
        names.add(f"LANNER_{name.upper()}")
        alias = f.validation_alias
        names.update(a for a in getattr(alias, "choices", [])
                     if isinstance(a, str) and a.startswith("LANNER_"))
    return names


def test_compose_config_default(compose):
    cfg = resolved_config(compose)
    services = cfg["services"]
    assert {"lanner", "prometheus", "grafana"} <= set(services)
    for name in ("lanner", "prometheus", "grafana"):
        assert not services[name].get("profiles"), f"{name} must run without a profile"

    lanner = services["lanner"]
    assert lanner["image"] == "lanner:local" and lanner["build"]["context"] == str(ROOT)
    assert any(int(p["target"] if isinstance(p, dict) else str(p).split(":")[-1]) == 8000
               for p in lanner["ports"])
    assert mounts(lanner)[CACHE_IN_IMAGE] == "lanner-cache" and "lanner-cache" in cfg["volumes"]
    hc = lanner["healthcheck"]
    assert hc["test"] == ["CMD", "python", "/usr/local/bin/lanner-healthcheck", "/ready"]
    assert hc["start_period"] and hc["retries"] >= 1

    env = env_of(lanner)
    assert env["LANNER_HOST"] == "0.0.0.0" and str(env["LANNER_PORT"]) == "8000"
    unknown = {k for k in env if k.startswith("LANNER_")} - read_settings_env_names()
    assert not unknown, f"compose passes variables `lanner serve` does not read: {unknown}"
    # unset in the shell -> not passed (an empty value would be read as a setting, e.g. `--config ""`)
    fixed = ("LANNER_HOST", "LANNER_PORT", "LANNER_LOG_LEVEL")
    assert all(env[k] in (None, "") or k in fixed for k in env), env
    assert all(env.get(k) is None for k in ("LANNER_MODEL", "LANNER_API_KEY", "LANNER_CONFIG")), env

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    g_env = env_of(grafana)
    assert str(g_env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert g_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    g_mounts = mounts(grafana)
    assert g_mounts["/etc/grafana/provisioning"] == str(ROOT / "configs/grafana/provisioning")
    assert g_mounts["/var/lib/grafana/dashboards"] == str(ROOT / "configs/grafana/dashboards")

    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"] == str(ROOT / "configs/prometheus.yml")


def test_compose_config_replicas_profile(compose):
    cfg = resolved_config(compose, "--profile", "replicas")
    services = cfg["services"]
    assert set(LANNER_SERVICES + REPLICA_SERVICES + ("prometheus", "grafana")) <= set(services)
    for name in REPLICA_SERVICES:
        assert services[name]["profiles"] == ["replicas"], name

    lanner = services["lanner"]
    cpus = []
    for name in ("lanner-1", "lanner-2"):
        replica = services[name]
        # same image, volume and health check as `lanner` (the YAML anchors), no published port
        for key in ("image", "build", "healthcheck", "init", "stop_grace_period"):
            assert replica[key] == lanner[key], (name, key)
        assert mounts(replica) == mounts(lanner) and not replica.get("ports")
        env = env_of(replica)
        assert str(env["LANNER_CPUS"]) == str(replica["cpuset"]), name
        assert {k: v for k, v in env.items() if k != "LANNER_CPUS"} == \
            {k: v for k, v in env_of(lanner).items() if k != "LANNER_CPUS"}
        cpus.append(str(replica["cpuset"]))
    assert cpus[0] != cpus[1], "the replicas must be pinned to different cores"

    nginx = services["nginx"]
    assert nginx["image"].startswith("nginx")
    assert mounts(nginx)["/etc/nginx/nginx.conf"] == str(ROOT / "configs/nginx/nginx.conf")
    assert 8080 in {int(p["target"] if isinstance(p, dict) else str(p).split(":")[-1])
                    for p in nginx["ports"]}
    deps = nginx["depends_on"]
    assert {d: deps[d]["condition"] for d in deps} == {"lanner-1": "service_healthy",
                                                       "lanner-2": "service_healthy"}
    assert "/nginx-health" in " ".join(nginx["healthcheck"]["test"])


def test_compose_passes_lanner_settings_through(compose):
    env = compose_env(LANNER_MODEL="TinyLlama/TinyLlama-1.1B-Chat-v1.0", LANNER_QUANTIZE="int8",
                      LANNER_REPLICA1_CPUS="2-3", LANNER_REPLICA2_CPUS="4-5")
    services = resolved_config(compose, "--profile", "replicas", env=env)["services"]
    for name in LANNER_SERVICES:
        e = env_of(services[name])
        assert e["LANNER_MODEL"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0", name
        assert e["LANNER_QUANTIZE"] == "int8", name
    assert env_of(services["lanner-1"])["LANNER_CPUS"] == services["lanner-1"]["cpuset"] == "2-3"
    assert env_of(services["lanner-2"])["LANNER_CPUS"] == services["lanner-2"]["cpuset"] == "4-5"


def test_compose_agrees_with_the_files_it_mounts(compose):
    """Bind-mount sources exist (Docker would create a missing one as an empty dir) and match the services."""
    cfg = resolved_config(compose, "--profile", "replicas")
    for name, service in cfg["services"].items():
        for dst, src in mounts(service).items():
            if src.startswith("/"):
                assert Path(src).exists(), f"{name}: {src} -> {dst} does not exist"
                assert Path(src).is_file() == dst.endswith((".yml", ".yaml", ".conf")), (name, src, dst)
    # Prometheus scrapes every Lanner service by its compose name
    prom = yaml.safe_load((ROOT / "configs/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    assert {f"{s}:8000" for s in LANNER_SERVICES} <= targets, targets
    # Grafana: the dashboard provider reads the directory compose mounts, the datasource is the service
    grafana_dir = ROOT / "configs/grafana/provisioning"
    providers = [p for f in (grafana_dir / "dashboards").glob("*.y*ml")
                 for p in yaml.safe_load(f.read_text()).get("providers", [])]
    assert "/var/lib/grafana/dashboards" in {p["options"]["path"] for p in providers}
    sources = [d for f in (grafana_dir / "datasources").glob("*.y*ml")
               for d in yaml.safe_load(f.read_text()).get("datasources", [])]
    assert "http://prometheus:9090" in {d["url"] for d in sources}


# --- Dockerfile ----------------------------------------------------------------------------------------

@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each a list of (INSTRUCTION, arguments)."""
    lines: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((pending + line).strip())
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        ins, _, args = line.partition(" ")
        ins, args = ins.upper(), args.strip()
        if ins == "FROM":
            parts = args.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m.group(1)], parts[0])
            stages.append(Stage(base, parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None))
        elif not stages:
            assert ins == "ARG", f"{ins} before the first FROM"
            k, _, v = args.partition("=")
            global_args[k] = v
        else:
            stages[-1].instructions.append((ins, args))
    return global_args, stages


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def stage_values(stage: Stage, ins: str) -> list[str]:
    return [a for i, a in stage.instructions if i == ins]


def env_pairs(args: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in shlex.split(args))


def torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==", 1)[1] for d in deps if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, deps
    return pins[0].strip()


def test_dockerfile_is_multi_stage_python_slim():
    _, stages = dockerfile()
    assert len(stages) >= 2 and stages[0].name == "builder"
    assert all(s.base == "python:3.11-slim" for s in stages), [s.base for s in stages]
    final = stages[-1]
    copies = stage_values(final, "COPY")
    venv = env_pairs(stage_values(stages[0], "ENV")[0])["VENV"]
    assert f"--from=builder {venv} {venv}" in copies, copies  # only the venv comes from the builder
    assert not any("--from" in c for c in copies if f"{venv} {venv}" not in c)
    assert not any("pip" in r for r in stage_values(final, "RUN")), "the final stage installs nothing"
    assert any(e.startswith(f"PATH={venv}/bin:") for e in shlex.split(" ".join(stage_values(final, "ENV"))))


def test_dockerfile_installs_pinned_cpu_torch_first():
    _, stages = dockerfile()
    builder = stages[0]
    args = dict(a.split("=", 1) for a in stage_values(builder, "ARG"))
    assert args["TORCH_VERSION"] == torch_pin(), "the Dockerfile's torch must be pyproject.toml's pin"
    assert args["TORCH_INDEX_URL"] == CPU_INDEX
    runs = stage_values(builder, "RUN")
    assert [shlex.split(r)[:3] for r in runs] == [["sh", "docker/install.sh", "torch"],
                                                  ["sh", "docker/install.sh", "app"]], runs
    script = (ROOT / "docker" / "install.sh").read_text()
    assert f'TORCH_INDEX_URL="${{TORCH_INDEX_URL:-{CPU_INDEX}}}"' in script
    assert 'pip" install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"' in script
    assert "torch.version.cuda is not None" in script  # the build fails on a CUDA torch


def test_dockerfile_runtime_settings():
    _, stages = dockerfile()
    final = stages[-1]
    runs = " ".join(stage_values(final, "RUN"))
    assert re.search(r"useradd\b.*--uid 1000\b.*\blanner\b", runs), runs
    assert re.search(r"apt-get install\b.*\bg\+\+", runs), "the image needs a compiler for the WOQ kernels"
    user = stage_values(final, "USER")
    assert user and user[-1].split(":")[0] in ("1000", "lanner"), user
    env = env_pairs(" ".join(stage_values(final, "ENV")))
    assert env["LANNER_HOST"] == "0.0.0.0" and env["LANNER_PORT"] == "8000"
    assert set(k for k in env if k.startswith("LANNER_")) <= read_settings_env_names()
    assert stage_values(final, "VOLUME") == [f'["{CACHE_IN_IMAGE}"]']
    assert stage_values(final, "EXPOSE") == ["8000"]
    assert stage_values(final, "ENTRYPOINT") == ['["lanner"]'] and stage_values(final, "CMD") == ['["serve"]']
    hc = stage_values(final, "HEALTHCHECK")
    assert len(hc) == 1
    assert re.search(r'\bCMD \["python", "/usr/local/bin/lanner-healthcheck", "/health"\]$', hc[0]), hc
    assert "--start-period=" in hc[0]
    assert "docker/healthcheck.py /usr/local/bin/lanner-healthcheck" in stage_values(final, "COPY")


def test_image_cache_volume_is_the_settings_default(monkeypatch):
    """The VOLUME is where `lanner serve` caches as user lanner (HOME=/home/lanner, no LANNER_CACHE_DIR)."""
    from app.config import default_cache_dir

    monkeypatch.setenv("HOME", "/home/lanner")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert str(default_cache_dir()) == CACHE_IN_IMAGE


# --- .dockerignore and the builder stage, for real --------------------------------------------------------

def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per .dockerignore line; Docker's matching: last match wins, parents count."""
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = posixpath.normpath(line.lstrip("!").strip("/"))
        rx = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        out.append((neg, re.compile(rx.replace(r"\?", "[^/]") + "$")))
    return out


def excluded(rel: str, patterns=None) -> bool:
    patterns = patterns if patterns is not None else dockerignore_patterns()
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for neg, rx in patterns:
        if any(rx.match(p) for p in prefixes):
            result = not neg
    return result


def test_dockerignore_keeps_the_context_small():
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "bench/results/x.json",
                 "app/__pycache__/cli.cpython-311.pyc", "lanner.egg-info/PKG-INFO", "docs/engine.md"):
        assert excluded(path), path
    for path in ("pyproject.toml", "README.md", "app/cli.py", "app/data/corpus.txt", "docker/install.sh",
                 "docker/healthcheck.py"):
        assert not excluded(path), path


def run_builder_stage(stage: Stage, global_args: dict[str, str], rootfs: Path, log,
                      extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Execute the builder stage's ARG/ENV/WORKDIR/COPY/RUN with image paths under `rootfs`."""
    patterns = dockerignore_patterns()
    values: dict[str, str] = dict(global_args)  # ARGs and ENVs, as the image sees them

    def expand(s: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), s)

    def host(image_path: str) -> Path:
        return rootfs / image_path.lstrip("/")

    workdir = "/"
    for ins, args in stage.instructions:
        if ins == "ARG":
            k, _, v = args.partition("=")
            values[k] = expand(v)
        elif ins == "ENV":
            values.update({k: expand(v) for k, v in env_pairs(args).items()})
        elif ins == "WORKDIR":
            workdir = posixpath.join(workdir, expand(args))
            host(workdir).mkdir(parents=True, exist_ok=True)
        elif ins == "COPY":
            *srcs, dest = shlex.split(args)
            assert not any(s.startswith("--") for s in srcs), f"unsupported COPY flags: {args}"
            dest_dir = dest.endswith("/") or len(srcs) > 1
            dest = posixpath.join(workdir, expand(dest))
            for src in srcs:
                src_path = ROOT / src
                files = [p for p in src_path.rglob("*") if p.is_file()] if src_path.is_dir() else [src_path]
                copied = 0
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    if excluded(rel, patterns):
                        continue
                    if src_path.is_dir():
                        target = host(dest) / f.relative_to(src_path)
                    else:
                        target = host(dest) / f.name if dest_dir else host(dest)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)
                    copied += 1
                assert copied, f"COPY {src}: nothing left after .dockerignore"
        elif ins == "RUN":
            assert not re.search(r"(^|\s)/\w", args), f"absolute path in a builder RUN line: {args}"
            env = {**os.environ, **{k: str(host(v)) if v.startswith("/") else v for k, v in values.items()},
                   # the image's python3 is 3.11: use this interpreter rather than whatever is on PATH
                   "PYTHON": sys.executable, **(extra_env or {})}
            log.write(f"\n$ {args}\n")
            log.flush()
            r = subprocess.run(["sh", "-c", args], cwd=host(workdir), env=env, stdout=log,
                               stderr=subprocess.STDOUT, timeout=1500)
            assert r.returncode == 0, f"RUN {args} failed ({r.returncode}); see {log.name}"
        else:
            raise AssertionError(f"the test can't execute {ins} in the builder stage")
    return values


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dockerfile_builder_stage_builds_a_working_venv(tmp_path: Path):
    global_args, stages = dockerfile()
    rootfs = tmp_path / "rootfs"
    log_path = tmp_path / "build.log"
    extra_env = {}
    try:
        socket.getaddrinfo(CPU_INDEX.split("/")[2], 443)
    except OSError:
        # Offline: the CPU index can't answer, and pip falls back to its configured find-links/extra
        # indexes (this machine's local torch+cpu wheel). Don't retry the dead index for every package.
        extra_env["PIP_RETRIES"] = "0"
    with open(log_path, "w") as log:
        values = run_builder_stage(stages[0], global_args, rootfs, log, extra_env)
    build_log = log_path.read_text()
    assert f"torch {torch_pin()}" in build_log and "(CPU build)" in build_log, build_log[-2000:]

    venv = rootfs / values["VENV"].lstrip("/")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    r = subprocess.run([str(venv / "bin" / "lanner"), "--version"], capture_output=True, text=True,
                       cwd=tmp_path, env=compose_env(), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"lanner {version}", (r.stdout, r.stderr)
    # the package came from the venv (as in the final image, which has no source tree)
    code = "import app, torch; print(app.__file__); print(torch.version.cuda)"
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    app_file, cuda = r.stdout.split()
    assert Path(app_file).is_relative_to(venv) and cuda == "None", r.stdout
    # the kernel source is packaged, and builds from the installed package (the image has g++)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "app.quant.kernels"], capture_output=True, text=True,
                       cwd=tmp_path, env={**compose_env(), "LANNER_KERNEL_CACHE": str(tmp_path / "kernels")},
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok: "), (r.stdout, r.stderr)
