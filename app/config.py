"""Settings: defaults < YAML config file < environment (LANNER_*) < command-line flags.

`load_settings()` is the only constructor used by the CLI and the tests; nothing is read at import time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

QuantMode = Literal["none", "int8", "int4"]
WoqBackendName = Literal["native", "torchao", "ipex"]  # = app.quant.woq.WoqBackendName (no torch import here)
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,127}$")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lanner"


def parse_cpu_list(spec: str) -> list[int]:
    """Parse a Linux cpu list such as "0-3,6" into sorted core ids."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if lo > hi:
                raise ValueError(f"bad cpu range {part!r}")
            cpus.update(range(lo, hi + 1))
        else:
            cpus.add(int(part))
    if not cpus:
        raise ValueError(f"empty cpu list {spec!r}")
    return sorted(cpus)


class ModelSpec(BaseModel):
    """One served model: where it comes from and how it runs."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: str
    quantize: QuantMode = "none"
    # who runs the quantized layers: native (ATen kernels), torchao or ipex (optional; app/quant/backends)
    woq_backend: WoqBackendName = "native"
    # int4 group size (input features per scale and zero point): 32 by default; 64 stores 4.5 bits per
    # weight (llama.cpp Q4_0's size), 128/256 fewer still, each a little less accurate (docs/quantization.md)
    int4_group_size: Literal[32, 64, 128, 256] | None = None
    # the output head of an int4 model: int8 (default; llama.cpp's Q4_0 files keep it at 6 bits) or int4
    # (like llama.cpp's --pure: the fewest bytes a token, at some accuracy; docs/quantization.md)
    int4_head: Literal["int8", "int4"] = "int8"
    # KV cache element type: auto = bf16 for a quantized model (half the bytes: twice the slots in a budget,
    # half the attention reads), fp32 otherwise (exact against transformers); app/models/kv_cache.py
    kv_cache_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    cpus: str | None = None  # e.g. "0-1"; default: every core this process may use
    num_threads: int | None = None  # default: one per pinned core
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = Field(default=16, ge=1, le=256)  # concurrent sequences (KV slots)
    max_num_batched_tokens: int = Field(default=512, ge=1)  # per-step token budget (chunked prefill)
    max_waiting_requests: int = Field(default=64, ge=0)  # queued choices beyond the KV slots; more -> 429
    max_waiting_tokens: int = Field(default=65536, ge=1)  # prompt tokens accepted but not yet prefilled
    kv_cache_gb: float | None = Field(default=None, gt=0)  # KV memory budget; default: max_num_seqs full slots
    # lite = a pre-quantized checkpoint in a worker without torch (app/lite: ~200 MiB less resident memory);
    # batched = Lanner's torch decoders; auto = lite for a pre-quantized checkpoint on the native backend where a
    # C++ compiler exists, else batched; reference = transformers modules, one seq at a time (docs/engine.md)
    runner: Literal["auto", "batched", "reference", "lite"] = "auto"
    # a new prompt continues from the longest prefix of it a free KV slot still holds (docs/engine.md)
    prefix_caching: bool = True
    revision: str | None = None

    @field_validator("id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not _MODEL_ID_RE.match(v) or ".." in v:
            raise ValueError(f"invalid model id {v!r}")
        return v

    @field_validator("cpus")
    @classmethod
    def _check_cpus(cls, v: str | None) -> str | None:
        if v is not None:
            parse_cpu_list(v)
        return v

    @model_validator(mode="after")
    def _check_head(self) -> ModelSpec:
        if self.int4_head == "int4" and self.quantize == "int8":
            raise ValueError(f"model {self.id!r}: int4_head: int4 applies to quantize: int4, not int8")
        return self

    @property
    def cpu_list(self) -> list[int] | None:
        return parse_cpu_list(self.cpus) if self.cpus else None


def _split_keys(v: Any) -> Any:
    if isinstance(v, str):
        return [k.strip() for k in v.split(",") if k.strip()]
    return v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LANNER_", extra="forbid", populate_by_name=True,
                                      env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    models: list[ModelSpec] = Field(default_factory=list)
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("api_keys", "LANNER_API_KEY", "LANNER_API_KEYS"),
    )
    model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    # quantize-at-load on the torch-free runner: quantize once into <cache_dir>/quantized and serve that
    # checkpoint (app/quant/cache.py); false: the torch runner quantizes in the worker at every start
    quantized_cache: bool = True
    log_level: str = "info"
    metrics_public: bool = False  # with API keys set, /metrics needs a key unless this is true
    api_key_file: Path | None = None  # more API keys, one per line (# comments allowed)
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)  # CORS off when empty
    max_request_body_bytes: int = Field(default=2 * 2**20, ge=1024)  # larger bodies -> 413
    max_header_bytes: int = Field(default=32 * 1024, ge=4096)  # all request headers; larger -> 431
    max_json_depth: int = Field(default=32, ge=4)  # deeper JSON nesting -> 400
    queue_timeout: float = Field(default=300.0, gt=0)  # seconds a request may wait for its first token
    request_timeout: float = Field(default=1800.0, gt=0)  # seconds a request may take in all
    otlp_traces_endpoint: str | None = None  # e.g. http://otel-collector:4318/v1/traces; tracing off when unset
    drain_timeout: float = Field(default=30.0, ge=0)  # on SIGTERM, seconds in-flight requests get to finish
    # Idle keep-alive connections are closed after this. Longer than clients' and proxies' own idle expiry
    # (httpx 5 s, nginx upstream 60 s), so they close first: a server closing a connection at the moment a
    # client reuses it loses that request (the client sees "server disconnected", no status).
    keep_alive_timeout: float = Field(default=75.0, gt=0)

    _split_api_keys = field_validator("api_keys", mode="before")(_split_keys)
    _split_roots = field_validator("model_roots", mode="before")(_split_keys)
    _split_origins = field_validator("cors_allow_origins", mode="before")(_split_keys)

    def all_api_keys(self) -> list[str]:
        """Keys from the flag/env/YAML plus `api_key_file` (read when the app is built)."""
        keys = list(self.api_keys)
        if self.api_key_file is not None:
            for line in Path(self.api_key_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        ids = [m.id for m in v]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"duplicate model ids: {sorted(dup)}")
        return v

    @property
    def demo_dir(self) -> Path:
        return self.cache_dir / "demo-models"

    @property
    def quantized_dir(self) -> Path | None:
        return self.cache_dir / "quantized" if self.quantized_cache else None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings with precedence: overrides (CLI) > env > YAML file > defaults.

    Overrides whose value is None are ignored, so CLI flags that were not given don't mask env/YAML.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": config_file})

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if config_file is not None:
                sources.append(YamlConfigSettingsSource(settings_cls))
            return tuple(sources)

    return _FileSettings(**{k: v for k, v in overrides.items() if v is not None})
