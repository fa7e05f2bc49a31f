"""One worker process per model, pinned to the model's cores.

Why a process: the forward pass, sampling and detokenization hold the GIL for part of every step; in a
separate process they can't slow the HTTP event loop, and the model's OpenMP thread pool can be pinned to
its own cores (affinity is set before torch is imported, so every compute thread inherits it).

Wire protocol (two one-way pipes, so neither side ever reads and writes the same connection from two
threads):
    API -> worker:  NewRequest | Abort | Stop
    worker -> API:  ("ready", info) once after loading, ("failed", message) if loading fails,
                    then ("out", ([(request_id, Delta | error message), ...], StepStats)) once per engine step
                    and after every batch of commands.
The worker exits when its command pipe closes, so it never outlives the server (and PR_SET_PDEATHSIG
covers a parent killed with SIGKILL).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import threading
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from app.engine.types import Abort, NewRequest, SamplingParams, Stop

log = logging.getLogger("lanner.engine")


@dataclass
class WorkerConfig:
    model_id: str
    model_path: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    cpus: list[int] | None
    num_threads: int | None
    runner: str  # "auto" | "batched" | "reference" | "lite" (see resolve_runner)
    kv_cache_bytes: int | None
    log_level: str = "INFO"
    quantize: str = "none"  # none | int8 | int4 (weight-only, app/quant/woq.py)
    woq_backend: str = "native"  # native | torchao | ipex (app/quant/backends)
    int4_group_size: int | None = None  # None: the quantizer's default (32)
    int4_head: str = "int8"  # int8 | int4: the output head of a model quantized to int4 at load
    kv_cache_dtype: str = "auto"  # auto | fp32 | bf16 (app/models/kv_cache.py)
    prefix_caching: bool = True  # reuse a free slot's cached prompt prefix (EngineCore)
    # where quantize-at-load writes its checkpoint for the torch-free runner (app/quant/cache.py); None: off,
    # the torch runner quantizes in the worker
    quantized_cache_dir: str | None = None
    # set by the worker itself: the cached checkpoint its runner reads instead of model_path's weights
    weights_path: str | None = None
    # From the API process, which has read the model with transformers already: the ModelInfo with a
    # ConfigView (`ModelInfo.for_worker`) and the tokenizer's Rust backend (`backend_tokenizer_json`).
    # With both the worker never imports transformers; without them it reads model_path itself.
    info: Any = None
    tokenizer_json: str | None = None


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """Whole CPUs allowed by a cgroup v2 quota (a container's `cpus:` / a pod's CPU limit), if any.
    Without the static CPU manager a pod sees every core of its node; the quota is what it may use."""
    try:
        quota, period = open(path).read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(int(quota) // int(period)))


def process_name(model_id: str) -> str:
    """The worker's name in ps/top (Linux comm, at most 15 bytes)."""
    return f"lw:{model_id}"[:15]


def _prctl_setup(model_id: str) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the server even on SIGKILL
        libc.prctl(15, ctypes.c_char_p(process_name(model_id).encode()))  # PR_SET_NAME
    except OSError:  # not Linux/glibc: the closed command pipe still stops the worker
        pass


def worker_main(cfg: WorkerConfig, commands: Connection, outputs: Connection) -> None:
    _prctl_setup(cfg.model_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop (Ctrl-C hits the group)
    logging.basicConfig(level=cfg.log_level, format=f"%(asctime)s %(levelname)s {cfg.model_id}: %(message)s")
    if cfg.cpus:
        os.sched_setaffinity(0, cfg.cpus)
    cpus = sorted(os.sched_getaffinity(0))
    threads = cfg.num_threads or min(len(cpus), cgroup_cpu_limit() or len(cpus))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        cfg = _resolve_weights(cfg)
        if cfg.runner != "lite":  # the lite runner's OpenMP threads follow OMP_NUM_THREADS; torch is never imported
            import torch

            torch.set_num_threads(threads)
        core = _build_core(cfg, emit=lambda batch, stats: _send_outputs(outputs, batch, stats))
    except Exception as exc:
        from app.models.loader import ModelLoadError

        if isinstance(exc, ModelLoadError):  # a diagnosed problem (e.g. a WOQ backend missing): no traceback
            log.error("loading failed: %s", exc)
        else:
            log.exception("loading failed")
        outputs.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    report = getattr(core.runner, "quant_report", None)
    kv = getattr(core.runner, "kv", None)
    outputs.send(("ready", {"pid": os.getpid(), "cpus": cpus, "num_threads": threads,
                            "max_num_seqs": core.runner.max_num_seqs, "runner": type(core.runner).__name__,
                            "quantization": report.mode if report else cfg.quantize,
                            "backend": report.backend if report else "transformers",
                            "kernel": report.kernel if report else "transformers",
                            "isa": report.isa if report else "",
                            "kv_cache_dtype": _kv_dtype_name(kv)}))
    threading.Thread(target=_pump_commands, args=(commands, core), daemon=True, name="lanner-commands").start()
    core.run_forever()


def _resolve_weights(cfg: WorkerConfig) -> WorkerConfig:
    """`cfg` with its runner resolved (`auto`) and, for quantize-at-load on the torch-free runner, its weights
    replaced by the cached checkpoint (made now if missing; app/quant/cache.py)."""
    from app.models.loader import ModelLoadError
    from app.quant.manifest import is_quantized_dir

    path = cfg.info.path if cfg.info else cfg.model_path
    asked = cfg.runner
    runner = resolve_runner(asked, path, cfg.woq_backend, cfg.quantize, cfg.quantized_cache_dir)
    cfg = replace(cfg, runner=runner)
    if runner != "lite" or cfg.quantize == "none" or is_quantized_dir(path):
        return cfg
    if cfg.quantized_cache_dir is None:
        raise ModelLoadError(f"runner: lite serves pre-quantized checkpoints, and quantize: {cfg.quantize} of "
                             f"{path} would be quantized into the cache, which is off (quantized_cache: false): "
                             "turn it on, run `lanner quantize`, or use runner: batched")
    from app.quant.cache import QuantizeCacheError, quantized_copy

    try:
        cached = quantized_copy(Path(path), cfg.quantize, Path(cfg.quantized_cache_dir),
                                group_size=cfg.int4_group_size, int4_head=cfg.int4_head)
    except QuantizeCacheError as exc:
        if asked != "auto":
            raise ModelLoadError(f"runner: lite cannot serve {path} quantized at load: {exc}") from exc
        log.warning("%s; quantizing at load on the torch runner instead", exc)
        return replace(cfg, runner="batched")
    # the checkpoint holds the quantize options now; config and tokenizer stay the source's
    return replace(cfg, weights_path=str(cached), int4_group_size=None, int4_head="int8")


def _kv_dtype_name(kv: Any) -> str:
    if kv is None:
        return "transformers"
    return getattr(kv, "dtype", None) or str(kv.k[0].dtype).removeprefix("torch.")  # the lite KV names its dtype


def _send_outputs(outputs: Connection, batch: list, stats: Any) -> None:
    try:
        outputs.send(("out", (batch, stats)))
    except (BrokenPipeError, OSError):  # the server is gone; nobody is left to read these
        pass


def _pump_commands(commands: Connection, core: Any) -> None:
    try:
        while True:
            core.inbox.put(commands.recv())
    except (EOFError, OSError):
        core.inbox.put(Stop())


def _build_core(cfg: WorkerConfig, emit: Callable[[list, Any], None]) -> Any:
    from app.engine.worker import EngineCore
    from app.models.loader import inspect_model_dir, load_tokenizer, worker_tokenizer
    from app.heap import trim_heap

    info = cfg.info or inspect_model_dir(cfg.model_path)
    tokenizer = worker_tokenizer(info.path, cfg.tokenizer_json) if cfg.info else load_tokenizer(info.path)
    if cfg.weights_path:  # a checkpoint of this model quantized into the cache (same config)
        info = replace(info, path=Path(cfg.weights_path))
    runner = build_runner(cfg.runner, info, cfg.max_model_len, cfg.max_num_seqs, cfg.kv_cache_bytes,
                          cfg.quantize, cfg.woq_backend, cfg.int4_group_size, cfg.kv_cache_dtype,
                          cfg.int4_head)
    return EngineCore(runner, tokenizer, info.eos_token_ids, emit_batch=emit,
                      max_num_batched_tokens=cfg.max_num_batched_tokens, on_idle=trim_heap,
                      prefix_caching=cfg.prefix_caching)


# environment switches that ask for the torch runner's kernel paths (app/quant/woq.py, app/models/stack.py)
TORCH_PATH_SWITCHES = ("LANNER_OWN_KERNELS", "LANNER_DECODER_STACK")
WOQ_KERNEL_ENV = "LANNER_WOQ_KERNEL"


def resolve_runner(kind: str, path: Any, woq_backend: str, quantize: str = "none",
                   quantized_cache_dir: str | None = None) -> str:
    """`auto`: the torch-free runner on the native backend when its library builds here, for a pre-quantized
    checkpoint or for quantize-at-load with a checkpoint cache (`quantized_cache_dir`); the torch runner
    otherwise (an fp32 model, another WOQ backend, an environment switch asking for the torch runner's kernel
    paths, or no working C++ build); other kinds as given."""
    if kind != "auto":
        return kind
    from app.quant.cbuild import switched_off
    from app.quant.manifest import is_quantized_dir

    quantized = is_quantized_dir(path) or (quantize != "none" and quantized_cache_dir is not None)
    if not quantized or woq_backend != "native":
        return "batched"
    if any(switched_off(env) for env in TORCH_PATH_SWITCHES) or \
            os.environ.get(WOQ_KERNEL_ENV, "").strip().lower() not in ("", "auto"):
        return "batched"
    from app.lite import native

    try:
        native.lib()  # built once per machine (cached), loaded here
    except Exception as exc:  # noqa: BLE001 - any build or load failure means the torch runner
        log.warning("runner auto: the torch-free runner cannot run here (%s); serving %s on the torch runner",
                    exc, path)
        return "batched"
    return "lite"


def build_runner(kind: str, info: Any, max_model_len: int, max_num_seqs: int, kv_cache_bytes: int | None,
                 quantize: str = "none", woq_backend: str = "native", int4_group_size: int | None = None,
                 kv_cache_dtype: str = "auto", int4_head: str = "int8") -> Any:
    kind = resolve_runner(kind, info.path, woq_backend)
    if kind == "reference":
        if quantize != "none":
            raise ValueError(f"quantize={quantize!r} needs runner: batched (the reference runner is fp32)")
        if woq_backend != "native":
            log.warning("woq_backend=%s has no effect with runner: reference (fp32)", woq_backend)
        if kv_cache_dtype == "bf16":
            log.warning("kv_cache_dtype=bf16 has no effect with runner: reference (transformers' own cache)")
        from app.models.loader import ConfigView, inspect_model_dir, load_hf_model
        from app.models.reference import ReferenceRunner

        if isinstance(info.config, ConfigView):  # transformers' model class wants its own config class
            info = inspect_model_dir(info.path)
        return ReferenceRunner(load_hf_model(info), max_model_len, max_num_seqs)
    if kind == "lite":
        ignored = {"woq_backend": (woq_backend, "native"), "int4_group_size": (int4_group_size, None),
                   "int4_head": (int4_head, "int8")}
        for name, (value, default) in ignored.items():
            if value != default:
                log.warning("%s=%s has no effect with runner: lite (a pre-quantized checkpoint is served as stored, "
                            "on Lanner's kernels)", name, value)
        from app.lite.runner import load_lite_runner

        return load_lite_runner(info, max_model_len, max_num_seqs, kv_cache_bytes, quantize=quantize,
                                kv_cache_dtype=kv_cache_dtype)
    from app.models.runner import load_runner

    return load_runner(info, max_model_len, max_num_seqs, kv_cache_bytes, quantize=quantize,
                       woq_backend=woq_backend, int4_group_size=int4_group_size,
                       kv_cache_dtype=kv_cache_dtype, int4_head=int4_head)


class ProcessEngine:
    """API-side handle of a worker process; same surface as `ThreadEngine`."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.on_outputs: Callable[[list, Any], None] = lambda *_: None
        self.on_dead: Callable[[str], None] = lambda _: None
        self.info: dict[str, Any] = {}
        self._send_lock = threading.Lock()
        self._proc: mp.process.BaseProcess | None = None
        self._commands: Connection | None = None
        self._outputs: Connection | None = None
        self._stopping = False

    def start(self) -> None:
        """Spawn the worker and block until its model is loaded (call from a thread)."""
        ctx = mp.get_context("spawn")
        cmd_r, cmd_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=worker_main, args=(self.cfg, cmd_r, out_w),
                                 name=f"lanner-worker-{self.cfg.model_id}", daemon=True)
        self._proc.start()
        cmd_r.close()
        out_w.close()
        self._commands, self._outputs = cmd_w, out_r
        if self._stopping:  # shutdown() came before the process existed
            self._proc.terminate()
        try:
            kind, payload = out_r.recv()
        except EOFError:
            self._proc.join(5)
            if self._stopping:
                raise RuntimeError(f"worker for {self.cfg.model_id} stopped while loading") from None
            raise RuntimeError(f"worker for {self.cfg.model_id} exited with {self._proc.exitcode} while loading")
        if kind != "ready":
            self._proc.join(5)
            raise RuntimeError(f"worker for {self.cfg.model_id} failed to load: {payload}")
        self.info = payload
        threading.Thread(target=self._read_outputs, daemon=True, name=f"lanner-out-{self.cfg.model_id}").start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _read_outputs(self) -> None:
        assert self._outputs is not None
        try:
            while True:
                kind, payload = self._outputs.recv()
                if kind == "out":
                    self.on_outputs(*payload)
        except (EOFError, OSError):
            pass
        if not self._stopping:
            code = self._proc.exitcode if self._proc else None
            log.error("worker for %s died (exit code %s)", self.cfg.model_id, code)
            self.on_dead(f"the worker process for model {self.cfg.model_id} died")

    def _send(self, msg: Any) -> None:
        assert self._commands is not None
        with self._send_lock:
            self._commands.send(msg)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._send(NewRequest(request_id, list(prompt_ids), params))

    def abort(self, request_id: str) -> None:
        try:
            self._send(Abort(request_id))
        except (OSError, ValueError):  # worker already gone: nothing left to free
            pass

    def shutdown(self, timeout: float | None = None) -> None:
        self._stopping = True
        if self._proc is None:
            return
        try:
            self._send(Stop())
        except (OSError, ValueError):
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        if self._commands is not None:
            self._commands.close()
