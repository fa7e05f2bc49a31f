"""Model id -> loaded model (tokenizer, limits, engine client).

`prepare()` is quick and synchronous (resolve sources, read configs and tokenizers) so configuration
errors surface before the server starts listening. `start()` then loads weights in the background: the
server answers `/health` at once and `/ready` once every model is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from app.api.limits import Admission
from app.config import ModelSpec, Settings

log = logging.getLogger("lanner.registry")


@dataclass
class ModelHandle:
    spec: ModelSpec
    info: Any  # app.models.loader.ModelInfo
    tokenizer: Any
    created: int = field(default_factory=lambda: int(time.time()))
    client: Any = None  # app.engine.client.EngineClient once loaded
    engine: Any = None  # app.engine.process.ProcessEngine
    loading: Any = None  # the ProcessEngine while its worker loads (stop() ends it)
    error: str | None = None
    metrics: Any = None  # app.metrics.ModelMetrics once the registry has metrics
    admission: Any = None  # app.api.limits.Admission: the model's bounded waiting queue

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def max_model_len(self) -> int:
        limit = int(self.info.max_model_len)
        return min(limit, self.spec.max_model_len) if self.spec.max_model_len else limit

    @property
    def vocab_size(self) -> int:
        return int(self.info.vocab_size)

    @property
    def state(self) -> str:
        if self.error or (self.client is not None and self.client.dead_reason):
            return "failed"
        return "loading" if self.client is None else "ready"

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics  # app.metrics.Metrics, attached by create_app
        self.tracing: Any = None  # app.tracing.Tracing when configured, attached by create_app
        self.handles: dict[str, ModelHandle] = {}
        self._load_task: asyncio.Task[None] | None = None

    def prepare(self) -> None:
        from app.models.loader import describe_model_dirs, load_tokenizer, resolve_model_source

        paths = [resolve_model_source(spec.source, allowed_roots=self.settings.model_roots or None,
                                      cache_dir=self.settings.cache_dir / "hub", revision=spec.revision)
                 for spec in self.settings.models]
        # configs are read in a child process (transformers reads them only with torch imported); this
        # process keeps plain values and the tokenizers
        for spec, info in zip(self.settings.models, describe_model_dirs(paths), strict=True):
            self.handles[spec.id] = ModelHandle(spec=spec, info=info,
                                                tokenizer=load_tokenizer(info.path, info.tokenizer_class),
                                                admission=Admission(spec.max_num_seqs, spec.max_waiting_requests,
                                                                    spec.max_waiting_tokens))
        self.attach_metrics(self.metrics)

    def attach_metrics(self, metrics: Any) -> None:
        """Use this `app.metrics.Metrics`; every known model gets its series (at 0) right away."""
        self.metrics = metrics
        if metrics is not None:
            for handle in self.handles.values():
                handle.metrics = metrics.model(handle.id)
                handle.metrics.ready.set(0)

    async def start(self) -> None:
        if not self.handles:
            await asyncio.to_thread(self.prepare)
        self._load_task = asyncio.create_task(self._load_all(asyncio.get_running_loop()))

    async def wait_ready(self) -> None:
        if self._load_task is not None:
            await asyncio.shield(self._load_task)

    async def _load_all(self, loop: asyncio.AbstractEventLoop) -> None:
        for handle in self.handles.values():
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self._load_engine, handle, loop)
            except Exception as exc:  # keep serving the other models; /ready stays false
                handle.error = str(exc)
                log.exception("failed to load model %s", handle.id)
                continue
            seconds = time.perf_counter() - t0
            log.info("model %s ready in %.1fs", handle.id, seconds)
            if self.metrics is not None:
                from app import __version__

                info = handle.engine.info
                self.metrics.model(handle.id).loaded(seconds, {
                    "quantization": info.get("quantization", handle.spec.quantize),
                    "backend": info.get("backend", ""), "kernel": info.get("kernel", ""),
                    "runner": info.get("runner", handle.spec.runner),
                    "kv_cache_dtype": info.get("kv_cache_dtype", ""),
                    "cpus": ",".join(map(str, info.get("cpus", []))), "num_threads": info.get("num_threads", ""),
                    "version": __version__})
                self.metrics.watch_worker(handle.id, lambda e=handle.engine: e.pid if e.is_alive else None)

    def _load_engine(self, handle: ModelHandle, loop: asyncio.AbstractEventLoop) -> None:
        from app.engine.client import EngineClient
        from app.engine.process import ProcessEngine, WorkerConfig
        from app.models.loader import backend_tokenizer_json

        spec = handle.spec
        engine = ProcessEngine(WorkerConfig(
            model_id=spec.id,
            model_path=str(handle.info.path),
            max_model_len=handle.max_model_len,
            max_num_seqs=spec.max_num_seqs,
            max_num_batched_tokens=spec.max_num_batched_tokens,
            cpus=spec.cpu_list,
            num_threads=spec.num_threads,
            runner=spec.runner,
            kv_cache_bytes=int(spec.kv_cache_gb * 2**30) if spec.kv_cache_gb else None,
            log_level=self.settings.log_level.upper(),
            quantize=spec.quantize,
            woq_backend=spec.woq_backend,
            int4_group_size=spec.int4_group_size,
            int4_head=spec.int4_head,
            kv_cache_dtype=spec.kv_cache_dtype,
            prefix_caching=spec.prefix_caching,
            quantized_cache_dir=str(self.settings.quantized_dir) if self.settings.quantized_dir else None,
            info=handle.info.for_worker(),
            tokenizer_json=backend_tokenizer_json(handle.tokenizer),
        ))
        handle.loading = engine
        try:
            engine.start()
        finally:
            handle.loading = None
        handle.admission.slots = engine.info.get("max_num_seqs", handle.admission.slots)  # after the KV budget
        handle.engine, handle.client = engine, EngineClient(engine, loop, handle.metrics, self.tracing, spec.id)

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        # a worker still loading (or quantizing into the cache) is stopped at once: its load would only be
        # thrown away, and the process would wait for the thread that waits for it
        await asyncio.gather(*[asyncio.to_thread(h.loading.shutdown, 0.0)
                               for h in self.handles.values() if h.loading is not None],
                             *[asyncio.to_thread(h.engine.shutdown, 30.0)
                               for h in self.handles.values() if h.engine is not None])

    def get(self, model_id: str) -> ModelHandle | None:
        return self.handles.get(model_id)

    @property
    def is_ready(self) -> bool:
        return bool(self.handles) and all(h.is_ready for h in self.handles.values())
