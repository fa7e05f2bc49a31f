"""WOQ backend selection and the guards of the optional backends (no model needed).

The optional backends' real work -- logits against fp32, the worker's build path, checkpoints -- is in
tests/model/test_woq_backends.py; IPEX runs only in the separate torch 2.8 environment that
scripts/ipex-env.sh builds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from app.cli import _add_serve, _cli_models
from app.config import ModelSpec
from app.quant.backends import WoqBackendUnavailable
from app.quant.backends.ipex_backend import IPEX_TESTED, check_ipex_environment, choose_lowp_mode, major_minor
from app.quant.isa import detect_isa
from app.quant.woq import QuantReport, check_backend, kernel_plan, quantize_model

TORCH_IS_28 = major_minor(torch.__version__) == IPEX_TESTED
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def test_model_spec_backend_default_and_choices():
    assert ModelSpec(id="m", source="/x").woq_backend == "native"
    assert ModelSpec(id="m", source="/x", woq_backend="ipex").woq_backend == "ipex"
    with pytest.raises(ValidationError, match="woq_backend"):
        ModelSpec(id="m", source="/x", woq_backend="onnx")
    with pytest.raises(ValueError, match="native, torchao, ipex"):
        check_backend("onnx")


def _serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _add_serve(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_cli_flag_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("LANNER_WOQ_BACKEND", raising=False)
    argv = ["--model", str(tmp_path), "--quantize", "int8", "--woq-backend", "torchao"]
    [spec] = _cli_models(_serve_args(argv))
    assert (spec.quantize, spec.woq_backend) == ("int8", "torchao")
    [spec] = _cli_models(_serve_args(["--model", str(tmp_path)]))
    assert spec.woq_backend == "native"
    monkeypatch.setenv("LANNER_WOQ_BACKEND", "ipex")
    [spec] = _cli_models(_serve_args(["--model", str(tmp_path)]))
    assert spec.woq_backend == "ipex"
    [spec] = _cli_models(_serve_args(["--model", str(tmp_path), "--woq-backend", "native"]))  # flag beats env
    assert spec.woq_backend == "native"


def test_native_is_the_default_everywhere():
    plan = kernel_plan("int8")
    assert plan.backend == "native" and plan.impl is None
    assert QuantReport("int8").backend == "native"
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    assert quantize_model(model, "int8").backend == "native"


@pytest.mark.parametrize(("torch_version", "ipex_version", "match"), [
    ("2.13.0+cpu", "",
     r"not installed.*torch 2\.13\.0\+cpu.*IPEX 2\.8 needs torch 2\.8.*scripts/ipex-env\.sh"),
    ("2.13.0", "2.8.0", r"intel-extension-for-pytorch 2\.8\.0 needs torch 2\.8, but .* torch 2\.13\.0.*"
                        r"scripts/ipex-env\.sh"),
    ("2.8.0", "2.7.0", r"2\.7\.0 needs torch 2\.7, but .* torch 2\.8\.0"),
    ("2.8.0", "", r"not installed: pip install intel-extension-for-pytorch==2\.8\.0"),
])
def test_ipex_version_guard(torch_version, ipex_version, match):
    with pytest.raises(WoqBackendUnavailable, match=match):
        check_ipex_environment(torch_version, ipex_version)


def test_ipex_version_guard_accepts_matching_pair():
    assert check_ipex_environment("2.8.0+cu128", "2.8.0") == "2.8.0"


@pytest.mark.skipif(TORCH_IS_28, reason="torch 2.8 here: the IPEX environment, where IPEX loads")
def test_ipex_requested_with_this_torch_is_a_clear_error():
    """The live check in this environment (torch 2.13): refused before IPEX is ever imported."""
    with pytest.raises(WoqBackendUnavailable, match=r"torch 2\.8") as info:
        kernel_plan("int8", backend="ipex")
    assert "scripts/ipex-env.sh" in str(info.value)
    assert "intel_extension_for_pytorch" not in sys.modules


def test_ipex_lowp_mode_by_isa_and_override(monkeypatch):
    monkeypatch.delenv("LANNER_IPEX_LOWP_MODE", raising=False)
    avx2 = detect_isa("flags : avx2 fma", "AVX2")
    amx = detect_isa("flags : avx2 avx512f avx512_bf16 amx_tile amx_bf16", "AVX512")
    assert choose_lowp_mode(avx2)[0] == "none"
    assert choose_lowp_mode(amx)[0] == "bf16"
    monkeypatch.setenv("LANNER_IPEX_LOWP_MODE", "INT8")
    assert choose_lowp_mode(avx2) == ("int8", "forced by LANNER_IPEX_LOWP_MODE")
    monkeypatch.setenv("LANNER_IPEX_LOWP_MODE", "fp8")
    with pytest.raises(ValueError, match="LANNER_IPEX_LOWP_MODE"):
        choose_lowp_mode(avx2)


def test_torchao_backend_loads_or_says_what_to_install():
    """Where torchao is installed the backend loads; where it is not, the error names the extra."""
    if HAS_TORCHAO:
        plan = kernel_plan("int8", backend="torchao")
        assert plan.backend == "torchao" and plan.describe(["int8"]).startswith("torchao ")
    else:
        with pytest.raises(WoqBackendUnavailable, match=r"torchao package, which is not installed.*"
                                                        r"lanner\[torchao\]"):
            kernel_plan("int8", backend="torchao")


CHILD = """
import sys
from app.quant.backends import WoqBackendUnavailable
from app.quant.woq import kernel_plan
try:
    kernel_plan("int8", backend="torchao")
except WoqBackendUnavailable as exc:
    print("UNAVAILABLE", exc)
"""


def test_broken_torchao_install_is_a_clear_error(tmp_path):
    """A torchao that fails to import (here: a package of that name that raises, first on sys.path) is
    reported with the install hint, not as an ImportError traceback."""
    fake = tmp_path / "torchao"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise ImportError('undefined symbol: _ZN3c10 (built for another torch)')\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])}, check=False)
    assert r.returncode == 0, r.stderr
    assert "UNAVAILABLE woq_backend=torchao: importing torchao failed" in r.stdout
    assert "undefined symbol" in r.stdout and "lanner[torchao]" in r.stdout and "Traceback" not in r.stderr


def test_kv_cache_dtype_setting(monkeypatch, tmp_path):
    """`kv_cache_dtype` (ModelSpec, `--kv-cache-dtype`, LANNER_KV_CACHE_DTYPE): auto is bf16 for a quantized
    model and fp32 for an unquantized one; anything but auto/fp32/bf16 is refused."""
    from app.models.runner import resolve_kv_dtype

    monkeypatch.delenv("LANNER_KV_CACHE_DTYPE", raising=False)
    assert ModelSpec(id="m", source="/x").kv_cache_dtype == "auto"
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        ModelSpec(id="m", source="/x", kv_cache_dtype="fp8")
    [spec] = _cli_models(_serve_args(["--model", str(tmp_path), "--kv-cache-dtype", "bf16"]))
    assert spec.kv_cache_dtype == "bf16"
    monkeypatch.setenv("LANNER_KV_CACHE_DTYPE", "fp32")
    [spec] = _cli_models(_serve_args(["--model", str(tmp_path)]))
    assert spec.kv_cache_dtype == "fp32"
    assert [resolve_kv_dtype("auto", q) for q in ("none", "int8", "int4")] == [
        torch.float32, torch.bfloat16, torch.bfloat16]
    assert resolve_kv_dtype("fp32", "int4") == torch.float32 and resolve_kv_dtype("bf16", "none") == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        resolve_kv_dtype("fp16", "none")


def test_runner_setting(monkeypatch, tmp_path):
    """`runner` (ModelSpec, `--runner`, LANNER_RUNNER): auto by default; anything but auto/batched/lite/reference
    is refused."""
    monkeypatch.delenv("LANNER_RUNNER", raising=False)
    assert ModelSpec(id="m", source="/x").runner == "auto"
    with pytest.raises(ValidationError, match="runner"):
        ModelSpec(id="m", source="/x", runner="fast")
    [spec] = _cli_models(_serve_args(["--model", str(tmp_path), "--runner", "lite"]))
    assert spec.runner == "lite"
    monkeypatch.setenv("LANNER_RUNNER", "batched")
    [spec] = _cli_models(_serve_args(["--model", str(tmp_path)]))
    assert spec.runner == "batched"
