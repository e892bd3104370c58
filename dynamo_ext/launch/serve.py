"""``dynamo-ext serve``: the whole local launch (see the package docstring for the protocol).

Exit status: 0 after a requested stop (Ctrl-C, SIGTERM, SIGHUP) or a successful ``--once``; 1 when a
child exits unexpectedly, is not ready in time, or the ``--once`` request fails; 2 for a bad config,
graph, model directory or port; the cleanup runs in every case.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dynamo_ext.config import IMPORTED_PRESETS, ConfigError, DynamoExtConfig, load_config
from dynamo_ext.discovery.env import DISCOVERY_ENV_KEYS, etcd_is_plain

from . import infra
from .client import CompletionError, complete, curl_line, scrape
from .graph import Graph, GraphError, load_graph
from .modeldir import ModelDirError, ensure_model_dir
from .plan import LOOPBACK_ENV, child_env, frontend_base, plan_processes
from .scaling import LauncherScaler
from .supervisor import Child, ChildSpec, RestartPolicy, Supervisor, SupervisorError, describe_status, indent

SUPERVISE_EVERY_S = 0.25  # how often the supervision thread looks at the children


@dataclass
class ServeOptions:
    graph: str
    config: str
    port: int | None = None
    model_dir: str | None = None
    log_dir: str | None = None
    once: str | None = None
    max_tokens: int = 32
    ready_timeout: float = 300.0
    stop_timeout: float = 10.0
    tolerate_exits: bool = False
    python: str = sys.executable
    planner: bool | None = None  # None: planner.enabled decides; True: required (exit 2 if it cannot run); False: off
    planner_config: str | None = None  # a Dynamo planner config to use instead of the generated one
    env: dict[str, str] | None = None  # added to every child's environment (after the loopback defaults)
    quiet_progress: bool = False  # no "[serve] ... ready 3/5" progress line while waiting


class LaunchError(Exception):
    """A launch could not start (or had to stop): ``code`` is serve's exit status (2 for bad input, 1 otherwise)."""

    def __init__(self, message: str, code: int = 1) -> None:
        self.code = code
        super().__init__(message)


class _Stop(Exception):
    """A stop was requested by a signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextmanager
def _signal_handlers(launch: Launch) -> Iterator[None]:
    """The first SIGTERM/SIGINT/SIGHUP raises :class:`_Stop`; once stopping, later ones are ignored so a
    second Ctrl-C cannot abort the cleanup half-way."""

    def handler(signum: int, _frame: object) -> None:
        if not launch.stopping:
            launch.stopping = True
            raise _Stop(signum)

    old = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Progress:
    """One status line: rewritten in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, out: TextIO, every: float = 5.0) -> None:
        self.out, self.every, self.last, self.tty = out, every, 0.0, out.isatty()

    def __call__(self, text: str) -> None:
        if self.tty:
            self.out.write(f"\r\033[K[serve] {text}")
            self.out.flush()
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(f"[serve] {text}", file=self.out, flush=True)

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()




def visible_gpu_count() -> int:
    """CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applies); 0 without torch or CUDA. torch counts
    through NVML where it can, so the launcher creates no CUDA context."""
    try:
        import torch  # noqa: PLC0415

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 0


def _instance_ids(children: list[Child]) -> set[int]:
    ids = set()
    for c in children:
        raw = c.ready_info.get("instance_id")
        if raw:
            try:
                ids.add(int(raw, 0))
            except ValueError:
                pass
    return ids


def _answer_text(resp: dict[str, Any]) -> str:
    choices = resp.get("choices") or [{}]
    return str(choices[0].get("text", ""))


class Launch:
    """One launch of a graph. ``run()`` is ``dynamo-ext serve`` (returns the exit status); the same steps are
    public for :func:`dynamo_ext.launch.launch_graph`: ``prepare()`` (config, graph, port, model directory,
    log directory), ``start()`` (etcd/NATS, children, readiness, planner), ``stop(code)`` (children in
    reverse order, etcd record audit, servers we started, work directory). ``prepare`` and ``start`` raise
    :class:`LaunchError`; ``stop`` is idempotent and returns the final exit status."""

    def __init__(self, opts: ServeOptions, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.opts = opts
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.infra_sup: Supervisor | None = None
        self.sup: Supervisor | None = None
        self.etcd: infra.ServerPlan | None = None
        self.workdir: Path | None = None
        self.stopping = False
        self.stopped: int | None = None  # the exit status once stop() ran
        self.executor: Any = None  # planner.executor.ExecutorThread while the planner runs
        self.scaler: LauncherScaler | None = None
        self.run_planner = False
        self.config: DynamoExtConfig | None = None
        self.graph: Graph | None = None
        self.port = 0
        self.model_dir: Path | None = None
        self.log_dir: Path | None = None
        self.base = ""  # the frontend's base URL once started
        self.ready_s = 0.0
        self.gpu_count = 0  # visible CUDA devices (counted under model.device: cuda)
        self.policy = RestartPolicy()
        self.failure: SupervisorError | None = None  # restarts exhausted (or a child exited without restarts)
        self.events: list[tuple[float, str, str, str]] = []  # (time.time(), kind, child name, text)
        self._watcher: threading.Thread | None = None
        self._watch_end = threading.Event()
        self._check_lock = threading.Lock()

    def say(self, text: str) -> None:
        print(f"[serve] {text}", file=self.err, flush=True)

    def fail(self, text: str, code: int) -> int:
        print(f"dynamo-ext serve: {text}", file=self.err, flush=True)
        return code

    # -- the CLI --------------------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.prepare()
        except LaunchError as e:
            return self.fail(str(e), e.code)
        code = 1
        with _signal_handlers(self):
            try:
                self.start()
                code = self._serve()
            except _Stop as s:
                print(file=self.err)
                self.say(f"{s} received: stopping")
                code = 0
            except LaunchError as e:
                code = self.fail(str(e), e.code)
            except SupervisorError as e:
                code = self.fail(str(e), 1)
            except infra.InfraError as e:
                code = self.fail(str(e), 2)
            finally:
                self.stopping = True
                code = self.stop(code)
        return code

    def _serve(self) -> int:
        """After start(): the ready banner, then ``--once`` or supervise until a signal or a failure."""
        assert self.sup is not None and self.infra_sup is not None and self.config is not None
        assert self.graph is not None
        o, config = self.opts, self.config
        ids = _instance_ids(self.sup.children)
        print(f"dynamo-ext serve: ready in {self.ready_s:.1f}s; {self.graph.describe(config)}", file=self.out)
        print(f"  OpenAI API: {self.base}/v1  (model {config.model.name}; {len(ids)} registered instances)",
              file=self.out)  # fmt: skip
        print(f"  try:  {curl_line(self.base, config.model.name)}", file=self.out, flush=True)
        if o.once is not None:
            return self._once(self.base, config.model.name)
        print("  Ctrl-C to stop", file=self.out, flush=True)
        while True:
            try:
                self.check()
            except SupervisorError as e:
                return self.fail(str(e), 1)
            time.sleep(0.5)

    def _restart_policy(self, config: DynamoExtConfig) -> RestartPolicy:
        s = config.supervision
        if self.opts.tolerate_exits:
            self.say("--tolerate-exits is deprecated: supervision.restart (on by default) restarts a child that exits"
                     + ("" if s.restart else "; with supervision.restart: false it still tolerates the exit of a "
                        "worker whose siblings of the same component live"))  # fmt: skip
        return RestartPolicy(enabled=s.restart, max_restarts=s.max_restarts, window_s=s.window_s,
                             backoff_initial_s=s.backoff_initial_s, backoff_max_s=s.backoff_max_s)

    # -- the steps ------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Load and check everything before a process starts; raises :class:`LaunchError` (code 2)."""
        o = self.opts
        try:
            config = load_config(o.config)
            graph = load_graph(o.graph)
            graph.validate(config)
        except ConfigError as e:
            raise LaunchError(f"{e.source}: invalid config:\n" + "\n".join(f"  {line}" for line in e.lines), 2) from None
        except GraphError as e:
            raise LaunchError(f"{o.config} does not fit graph {e.graph!r}:\n" + "\n".join(f"  {x}" for x in e.lines),
                              2) from None  # fmt: skip
        except (ImportError, OSError, SyntaxError) as e:
            raise LaunchError(f"cannot load graph {o.graph!r}: {e}", 2) from None
        self.config, self.graph = config, graph
        self.run_planner = self._planner_check(config, graph)
        port = o.port or config.frontend.http_port
        host = config.frontend.http_host
        if not infra._port_free(host, port):
            raise LaunchError(f"port {port} on {host} is in use (choose another with --port)", 2)
        self.port = port
        self.gpu_count = visible_gpu_count() if config.model.device == "cuda" else 0
        if config.model.device == "cuda" and self.gpu_count < 1:
            raise LaunchError("model.device is 'cuda' but no CUDA device is visible here (torch.cuda.device_count() "
                              "is 0)", 2)
        try:
            model_dir, how = ensure_model_dir(config.model, o.model_dir, progress=self.say)
        except ModelDirError as e:
            raise LaunchError(str(e), 2) from None
        except (ImportError, OSError, ValueError) as e:  # the engine (torch) missing, a cache we cannot write
            raise LaunchError(f"cannot generate or import the model directory for preset {config.model.preset!r}: {e}",
                              2) from None
        self.model_dir = model_dir
        self.say(f"{graph.describe(config)}")
        noise = ("; random weights: its text is noise, the path is the point"
                 if how in ("cached", "generated") and config.model.preset not in IMPORTED_PRESETS else "")
        self.say(f"model {config.model.name}: {model_dir} ({how}{noise})")
        self.log_dir = Path(o.log_dir) if o.log_dir else Path(tempfile.mkdtemp(prefix="dynamo-ext-serve-"))
        self.workdir = Path(tempfile.mkdtemp(prefix="dynamo-ext-infra-"))
        self.policy = self._restart_policy(config)
        self.infra_sup = Supervisor(self.log_dir, policy=self.policy, on_event=self._supervision_event)
        self.sup = Supervisor(self.log_dir, on_tolerated=self._tolerated, policy=self.policy,
                              on_event=self._supervision_event)  # fmt: skip
        self.say(f"logs: {self.log_dir}")

    def start(self) -> None:
        """etcd and NATS (reused or started), every child of the graph, readiness, the planner. Raises
        :class:`LaunchError` (a child exited or was not ready: 1; etcd/NATS cannot be had: 2)."""
        assert self.sup is not None and self.infra_sup is not None and self.workdir is not None
        assert self.config is not None and self.graph is not None and self.model_dir is not None
        o, config = self.opts, self.config
        etcd_urls = config.discovery.etcd.endpoints
        nats_url = config.discovery.nats.url
        try:
            self.etcd = infra.ensure_etcd(etcd_urls, self.workdir, child_env(config, etcd_urls[0], nats_url),
                                          discovery=config.discovery)
            nats = infra.ensure_nats(nats_url, self.workdir, child_env(config, self.etcd.url, nats_url),
                                     discovery=config.discovery)
        except infra.InfraError as e:
            raise LaunchError(str(e), 2) from None
        for srv in (self.etcd, nats):
            if srv.reused:
                self.say(f"{srv.name}: using the one at {srv.url}")
            else:
                assert srv.spec is not None
                self.infra_sup.start(srv.spec)
                self.say(f"{srv.name}: none at {srv.url}, started one (data in {self.workdir})")
        try:
            self.infra_sup.wait_ready(30.0)
        except SupervisorError as e:
            raise LaunchError(str(e), 1) from None
        env = child_env(config, ",".join(etcd_urls) if self.etcd.reused else self.etcd.url, nats.url)
        env.update(o.env or {})
        # a stopping worker drains in-flight requests for DYNAMO_EXT_DRAIN_S: finish before our SIGKILL
        env.setdefault("DYNAMO_EXT_DRAIN_S", f"{max(1.0, o.stop_timeout - 3.0):g}")
        try:
            specs = plan_processes(graph=self.graph, config=config, config_path=Path(o.config).resolve(),
                                   model_dir=self.model_dir, port=self.port, env=env, python=o.python,
                                   tolerate_exits=o.tolerate_exits, stop_timeout=o.stop_timeout,
                                   gpu_count=self.gpu_count)  # fmt: skip
        except ValueError as e:  # assign_devices: a configured gpu id that is not visible
            raise LaunchError(str(e), 2) from None
        t0 = time.monotonic()
        for spec in specs:
            self.sup.start(spec)
        progress = _Progress(self.err)
        try:
            self.sup.wait_ready(o.ready_timeout, None if o.quiet_progress else progress)
            self.infra_sup.check()
        except SupervisorError as e:
            raise LaunchError(str(e), 1) from None
        finally:
            progress.done()
        self.base = frontend_base(config.frontend.http_host, self.port)
        if self.run_planner:
            self._start_planner(config, self.graph, env, self.base)
        self.ready_s = time.monotonic() - t0
        self._watcher = threading.Thread(target=self._watch, name="serve-supervision", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """The supervision thread: restarts (and their readiness) happen here, whether or not anyone calls
        check(); a failure (restarts exhausted) is kept in ``self.failure`` for check() to raise. It lives until
        every child is stopped: the children it restarted have PR_SET_PDEATHSIG, which fires when the *thread*
        that spawned them ends."""
        while not self._watch_end.is_set():
            if not self.stopping and self.failure is None:
                try:
                    self.check()
                except SupervisorError as e:
                    if not self.stopping:
                        self.say(f"the graph cannot serve any more: {e}")
            self._watch_end.wait(SUPERVISE_EVERY_S)

    def _supervision_event(self, kind: str, child: Child, text: str) -> None:
        self.events.append((time.time(), kind, child.name, text))
        self.say(text)
        if kind == "exited":
            self._revoke_lease_of(child)

    def _revoke_lease_of(self, child: Child) -> None:
        """A dead worker's instance (its lease = its instance id) leaves discovery now rather than at the end of
        its lease TTL, so routers stop choosing it (in the background: etcd may be the one that is down)."""
        raw = child.ready_info.get("instance_id")
        if not raw or self.etcd is None:
            return
        try:
            lease = int(raw, 0)
        except ValueError:
            return
        url = self.etcd.url

        def revoke() -> None:
            try:
                if infra.revoke_lease(url, lease):
                    self.say(f"{child.name}: lease {lease:x} of the exited instance revoked (out of discovery now)")
            except OSError:
                pass

        threading.Thread(target=revoke, name="revoke-lease", daemon=True).start()

    def _tolerated(self, child: Child) -> None:
        self.say(f"{child.name} exited ({describe_status(child.returncode)}); tolerated, siblings still serve; "
                 f"last lines of {child.log_path}:\n{indent(child.tail())}")  # fmt: skip

    def check(self) -> None:
        """Restart what exited (``supervision``) and raise :class:`SupervisorError` when the graph must stop: restarts
        of a child (or of etcd/NATS we started) exhausted, or, with ``supervision.restart: false``, a child that
        exited. Thread-safe; the supervision thread calls it every ``SUPERVISE_EVERY_S``."""
        if self.failure is not None:
            raise self.failure
        with self._check_lock:
            try:
                if self.infra_sup is not None:
                    self.infra_sup.check()
                if self.sup is not None:
                    self.sup.check()
            except SupervisorError as e:
                self.failure = e
                raise

    def serving(self) -> bool:
        """Full capacity: every child (and etcd/NATS we started) alive and ready, no restart pending."""
        return all(s.serving() for s in (self.infra_sup, self.sup) if s is not None)

    def _planner_check(self, config: DynamoExtConfig, graph: Graph) -> bool:
        """Whether to run the planner, before anything starts: ``planner.enabled`` (or ``--planner`` /
        ``--no-planner``). Dependencies missing or no decode component: a warning and no planner, or
        :class:`LaunchError` (exit 2) when ``--planner`` asked for it."""
        o = self.opts
        wanted = o.planner if o.planner is not None else config.planner.enabled
        if not wanted:
            return False
        why = "--planner" if o.planner else "planner.enabled is true"
        try:
            from planner.executor import planner_missing_dependencies
        except ImportError as e:
            missing = [f"the planner package ({e})"]
        else:
            missing = planner_missing_dependencies()
        problem = None
        if missing:
            problem = (f"{why} but Dynamo's planner cannot run here: missing {', '.join(missing)} (pip install "
                       "'dynamo-ext[planner]'; aisimulate_core comes from NVIDIA, see planner/README.md)")
        elif not any(c.role == "decode" for c, _n in graph.plan(config)):
            problem = f"{why} but graph {graph.name!r} has no decode component to scale"
        elif o.planner_config is not None and not Path(o.planner_config).is_file():
            problem = f"--planner-config {o.planner_config}: no such file"
        if problem is None:
            return True
        if o.planner or o.planner_config is not None:  # asked for on the command line: an error
            raise LaunchError(problem, 2)
        self.say(f"WARNING: {problem}; serving without the planner (fixed worker counts; "
                 "--planner makes this an error)")
        return False

    def _start_planner(self, config: DynamoExtConfig, graph: Graph, env: dict[str, str], base: str) -> None:
        """Dynamo's planner (environment virtual, our plugins) as a supervised child, and the executor
        thread that applies its decisions through :class:`LauncherScaler`; :class:`LaunchError` if it fails."""
        assert self.sup is not None
        o = self.opts
        import planner as planner_pkg
        from planner.executor import ExecutorThread, PlannerProcess
        from planner.local_config import write_planner_config

        roles = {c.role: c.name for c, _n in graph.plan(config) if c.role in ("prefill", "decode")}
        log_dir = self.sup.log_dir
        if o.planner_config is not None:
            cfg_path = Path(o.planner_config).resolve()
        else:
            cfg_path = write_planner_config(log_dir / "planner.yaml", config, [f"{base}/metrics"])
        root = str(Path(planner_pkg.__file__).resolve().parents[1])  # the directory that holds planner/
        proc = PlannerProcess(cfg_path, namespace=config.discovery.namespace, python=o.python,
                              extra_pythonpath=(root,))  # fmt: skip
        self.sup.start(ChildSpec("planner", proc.argv(), proc.env(env), stop_timeout=o.stop_timeout, cwd=root))
        # the executor's DistributedRuntime reads the same etcd / NATS / loopback variables as the children
        for k in (*LOOPBACK_ENV, *DISCOVERY_ENV_KEYS, "DYN_EVENT_PLANE"):
            if k in env:
                os.environ[k] = env[k]
        self.scaler = LauncherScaler(self.sup, roles, ready_timeout=o.ready_timeout, say=self.say)
        self.executor = ExecutorThread(self.scaler, config.discovery.namespace,
                                       drain_timeout_s=o.stop_timeout + 30.0, on_applied=self._applied)  # fmt: skip
        try:
            self.executor.start()
        except (RuntimeError, TimeoutError) as e:
            raise LaunchError(f"planner executor: {e}", 1) from None
        self.say(f"planner: {' '.join(proc.argv())} (log {log_dir / 'planner.log'}); executor running; "
                 f"bounds prefill {config.planner.min_prefill}..{config.planner.max_prefill}, "
                 f"decode {config.planner.min_decode}..{config.planner.max_decode}, "
                 f"every {config.planner.interval_s:g}s")

    def _applied(self, rec: Any) -> None:
        self.say(f"planner decision {rec.decision_id}: {rec.before} -> {rec.after} in {rec.seconds:.1f}s"
                 + (f"; ERROR {rec.error}" if rec.error else ""))  # fmt: skip

    def _once(self, base: str, model: str) -> int:
        assert self.sup is not None
        o = self.opts
        t = time.monotonic()
        try:
            resp = complete(base, model, o.once or "", o.max_tokens)
        except CompletionError as e:
            self.sup.check()  # a child that died under the request is the better explanation
            return self.fail(f"--once request failed: {e}", 1)
        usage = resp.get("usage") or {}
        print(f"prompt: {o.once!r}", file=self.out)
        print(f"answer: {_answer_text(resp)!r}", file=self.out)
        print(f"  ({usage.get('prompt_tokens', '?')} prompt + {usage.get('completion_tokens', '?')} completion tokens, "
              f"{time.monotonic() - t:.2f}s, finish_reason={(resp.get('choices') or [{}])[0].get('finish_reason')})",
              file=self.out, flush=True)  # fmt: skip
        print(f"  {self._kv_moved()}", file=self.out, flush=True)
        return 0

    def _kv_moved(self) -> str:
        """Whether the request was disaggregated, from the workers' ``dynamo_ext_kv_transfer_bytes_total``."""
        assert self.sup is not None
        moved = []
        for c in self.sup.children:
            url = c.ready_info.get("metrics", "")
            for labels, value in scrape(url, "dynamo_ext_kv_transfer_bytes_total") if url.startswith("http") else []:
                if value > 0:
                    how = " ".join(labels.get(k, "?") for k in ("backend", "direction", "path"))
                    moved.append(f"{c.name} {int(value):,} bytes ({how})")
        return "KV moved between workers: " + ("; ".join(moved) if moved else "none (served without a KV transfer)")

    def stop(self, code: int = 0) -> int:
        """Stop everything that was started, audit etcd, remove the work directory; idempotent: a second call
        returns the first call's exit status."""
        if self.stopped is not None:
            return self.stopped
        self.stopping = True
        code = self._cleanup(self.config, code)
        self.stopped = code
        return code

    def _cleanup(self, config: DynamoExtConfig | None, code: int) -> int:
        if self.executor is not None:
            self.executor.stop()  # no decision is applied while the workers stop
        if self.sup is not None and self.sup.children:
            self.say("stopping " + ", ".join(c.name for c in reversed(self.sup.children)))
            for name, how in self.sup.stop_all():
                self.say(f"  {name}: {how}")
            if config is not None:
                code = self._audit(config, code)
        if self.infra_sup is not None and self.infra_sup.children:
            for name, how in self.infra_sup.stop_all():
                self.say(f"  {name}: {how}")
        self._watch_end.set()  # (no restart since stopping was set; stop_all marked every child stopping)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=10)
        left = (self.sup.leftovers() if self.sup else []) + (self.infra_sup.leftovers() if self.infra_sup else [])
        if left:
            self.say(f"processes still alive after stop: {left}")
            code = code or 1
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.say(f"stopped (exit {code})")
        return code

    def _audit(self, config: DynamoExtConfig, code: int) -> int:
        """No record of a stopped instance may stay in etcd; leftovers (SIGKILLed workers) get their lease revoked."""
        assert self.sup is not None
        if self.etcd is None or not etcd_is_plain(config) or not infra.etcd_healthy(self.etcd.url):
            return code  # the JSON gateway audit speaks neither TLS nor etcd auth
        ns = config.discovery.namespace
        ours = None if not self.etcd.reused else _instance_ids(self.sup.all_children())  # None: every key is ours
        try:
            stale = self._stale(ns, ours)
            if stale:
                leases = {lease for _k, lease in stale if lease} | (ours or set())
                for lease in leases:
                    infra.revoke_lease(self.etcd.url, lease)
                still = self._stale(ns, ours)
                self.say(f"removed {len(stale) - len(still)} stale etcd records by revoking {len(leases)} leases"
                         + (f"; still there: {[k for k, _ in still]}" if still else ""))  # fmt: skip
                if still:
                    return code or 1
            else:
                self.say("etcd: no records left under " + ", ".join(p.format(ns=ns) for p in infra.WORKER_PREFIXES))
        except (OSError, ValueError, json.JSONDecodeError) as e:
            self.say(f"etcd: could not check for stale records: {e}")
        return code

    def _stale(self, ns: str, ours: set[int] | None) -> list[tuple[str, int]]:
        assert self.etcd is not None
        if ours is None:
            return [kv for p in infra.WORKER_PREFIXES for kv in infra.etcd_keys(self.etcd.url, p.format(ns=ns))]
        return infra.stale_records(self.etcd.url, ns, ours) if ours else []


def serve(opts: ServeOptions, out: TextIO | None = None, err: TextIO | None = None) -> int:
    return Launch(opts, out, err).run()
