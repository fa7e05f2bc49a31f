#!/usr/bin/env bash
# Build a separate environment for the IPEX weight-only-quantization backend and exercise it once:
#   torch==2.8.0 + intel-extension-for-pytorch==2.8.0 (IPEX 2.8 refuses any other torch) from the package
#   index, Lanner's other dependencies with torch held at 2.8.0 and transformers at 4.57.6 (see below),
#   then the WOQ backend tests with IPEX importable and a decode benchmark (fp32 vs native int8/int4 vs
#   ipex int8/int4, batch 1 and 8).
#
#   scripts/ipex-env.sh            # build (or reuse) the venv, run the tests and the benchmark
#   scripts/ipex-env.sh build      # only build the venv
#   scripts/ipex-env.sh test       # only the tests (venv must exist)
#   scripts/ipex-env.sh bench      # only the benchmark (venv must exist)
#
# The venv lives outside the repository (LANNER_IPEX_VENV, default ~/.cache/lanner/ipex-venv); wheels are
# downloaded once to LANNER_IPEX_WHEELS (default ~/.cache/lanner/ipex-wheels).  torch 2.8.0 from PyPI
# on x86_64 is the CUDA build: with its nvidia-* dependencies about 3.8 GB of wheels (the CPU-only build
# is on PyTorch's own index, which this project does not rely on).  Lanner itself is not installed into
# the venv: the tests and the benchmark run from the checkout (PYTHONPATH), so pip never sees Lanner's
# torch==2.13.0 pin.
#
# CPU-heavy steps (installing, tests, benchmark) run under `flock $LANNER_CPU_LOCK` (default
# /tmp/lanner-cpu.lock) so that they don't compete with other work on a small machine; set
# LANNER_CPU_LOCK= (empty) to run without it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/lanner"
VENV="${LANNER_IPEX_VENV:-$CACHE/ipex-venv}"
WHEELS="${LANNER_IPEX_WHEELS:-$CACHE/ipex-wheels}"
PY="${PYTHON:-python3}"
TORCH_VERSION=2.8.0
IPEX_VERSION=2.8.0
# IPEX 2.8 cannot be imported next to transformers 5: intel_extension_for_pytorch/transformers/models/
# reference/models.py imports transformers 4.x modules (modeling_attn_mask_utils, ...) in a try block and
# then uses their names at module level (NameError: MoeModelOutputWithPast).  IPEX validated 4.51.3; the
# newest 4.x, 4.57.6, imports with IPEX and runs Lanner (with the huggingface_hub 0.x it requires), so the
# IPEX environment overrides Lanner's transformers>=5 / huggingface_hub>=1 with it.
TRANSFORMERS_VERSION=4.57.6
RESULTS="${LANNER_IPEX_RESULTS:-$ROOT/bench/results/ipex}"
LOCK="${LANNER_CPU_LOCK-/tmp/lanner-cpu.lock}"
step="${1:-all}"

locked() {
    if [ -n "$LOCK" ]; then flock "$LOCK" "$@"; else "$@"; fi
}

say() { echo "ipex-env: $*" >&2; }

build() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        "$PY" -m venv "$VENV"
    fi
    mkdir -p "$WHEELS"
    say "downloading torch==$TORCH_VERSION and intel-extension-for-pytorch==$IPEX_VERSION to $WHEELS"
    "$VENV/bin/pip" download -q -d "$WHEELS" "torch==$TORCH_VERSION" "intel-extension-for-pytorch==$IPEX_VERSION"
    say "installing them into $VENV"
    locked "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" \
        "torch==$TORCH_VERSION" "intel-extension-for-pytorch==$IPEX_VERSION"
    # Lanner's dependencies except torch, and the test runner; torch is held by a constraint so pip
    # can neither upgrade nor replace it.
    local constraints="$VENV/lanner-constraints.txt"
    echo "torch==$TORCH_VERSION" > "$constraints"
    local deps
    deps="$("$VENV/bin/python" - "$ROOT/pyproject.toml" <<'PYEOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
held = ("torch", "transformers", "huggingface_hub")  # pinned by this script instead
deps = [d for d in project["dependencies"]
        if not d.replace(" ", "").startswith(held)]
test = [d for d in project["optional-dependencies"]["test"]
        if d.split(">")[0].split("=")[0] in ("pytest", "pytest-asyncio", "pytest-timeout")]
print("\n".join(deps + test))
PYEOF
)"
    say "installing Lanner's dependencies (torch held at $TORCH_VERSION, transformers $TRANSFORMERS_VERSION)"
    local -a reqs
    mapfile -t reqs <<< "$deps"
    locked "$VENV/bin/pip" install -q -c "$constraints" "${reqs[@]}" "transformers==$TRANSFORMERS_VERSION"
    "$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md
import torch
import intel_extension_for_pytorch as ipex  # fails here, not in the tests, if the combination is wrong
print("ipex-env: torch", torch.__version__, "| intel-extension-for-pytorch", ipex.__version__,
      "| transformers", md.version("transformers"), "| huggingface_hub", md.version("huggingface_hub"))
PYEOF
}

run_tests() {
    say "WOQ backend tests with IPEX importable"
    cd "$ROOT"
    mkdir -p "$RESULTS"
    # -p no:cacheprovider: the checkout is shared with the main venv; leave its .pytest_cache alone
    PYTHONPATH="$ROOT" LANNER_REQUIRE_WOQ_BACKENDS=ipex locked "$VENV/bin/python" -m pytest -p no:cacheprovider \
        -q -rs -s tests/unit/test_woq_backends.py tests/model/test_woq_backends.py 2>&1 | tee "$RESULTS/pytest.txt"
}

run_bench() {
    say "single-stream decode benchmark"
    cd "$ROOT"
    mkdir -p "$RESULTS"
    PYTHONPATH="$ROOT" locked "$VENV/bin/python" bench/ipex/decode.py --out "$RESULTS" "${BENCH_ARGS[@]}"
}

BENCH_ARGS=(--batch "${LANNER_IPEX_BENCH_BATCH:-1,8}")
case "$step" in
    build) build ;;
    test) run_tests ;;
    bench) run_bench ;;
    all) build; rc=0; run_tests || rc=$?; run_bench; exit "$rc" ;;
    *) echo "usage: $0 [all|build|test|bench]" >&2; exit 2 ;;
esac
