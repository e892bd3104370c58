"""Generic supervision of local child processes: start, readiness, failure reports, orderly stop.

Protocol
--------
* :class:`ChildSpec` says what to run (``argv``, full ``env``), under which ``component`` it is grouped
  for stopping, how readiness is decided (``ready``: a callable on the running :class:`Child`, for
  example :func:`ready_line` ``("DYNAMO_EXT_READY")``; ``None`` = ready once started), whether an
  unexpected exit is tolerated (``tolerate_exit``), and how long SIGTERM may take (``stop_timeout``).
* ``Supervisor.start(spec)`` runs the child in a new session (its own process group, pgid == pid) with
  stdout and stderr appended to ``<log_dir>/<name>.log``, and asks Linux to SIGTERM it if the
  supervisor dies (``PR_SET_PDEATHSIG``), so even a SIGKILLed supervisor leaks no direct child.
* ``wait_ready(timeout, progress)`` polls every child until each is ready; it raises
  :class:`ChildExited` (exit status + last log lines) as soon as one exits, :class:`ReadyTimeout` (the
  pending ones, with their last log lines) at the deadline. ``progress`` gets a one-line status.
* ``check()`` (call it periodically once serving; thread-safe) handles children that exited unexpectedly
  (any exit, 0 included, of a child not being stopped by us):
  - with a :class:`RestartPolicy` that is ``enabled`` (``dynamo-ext serve``: ``supervision.restart``, on by
    default) and a spec with ``restart=True``, the child is started again with the same argv, environment
    and log file (a ``[supervisor] restart N`` line marks the place) after a back-off: the n-th exit of that
    child within ``window_s`` waits ``min(backoff_max_s, backoff_initial_s * 2**(n-1))``. Exit n =
    ``max_restarts + 1`` within the window raises :class:`RestartsExhausted` (a :class:`ChildExited`: the
    exit status, the count, the last log lines). A restarted child is ready again when its spec's ``ready``
    says so (its log is read from the restart on: an old ready line does not count). The old :class:`Child`
    moves to ``retired``; ``children`` keeps the start order. Events (``exited``, ``restarted``, ``ready``)
    go to ``on_event(kind, child, text)``.
  - without restarts: :class:`ChildExited` for the first such child, unless its spec tolerates exits and
    a sibling of its component is alive; tolerated exits are reported once through ``on_tolerated``.
  A child marked ``stopping`` (by ``stop_group``, e.g. the planner executor's scale-down) is never restarted.
* ``stop_all()`` stops components in reverse start order. All processes of a component get SIGTERM on
  their process group together; after ``stop_timeout`` the groups still alive get SIGKILL. A group is
  done when ``/proc`` shows no live (non-zombie) process with its pgid, so grandchildren are covered.
  The result lists, per child, how it ended (``exit 0``, ``killed by SIGKILL after SIGTERM timeout``).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

ReadyCheck = Callable[["Child"], bool]
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes in Dynamo's logs, noise in a report


class SupervisorError(Exception):
    pass


class ChildExited(SupervisorError):
    def __init__(self, child: Child) -> None:
        self.child = child
        when = "before it was ready" if child.ready_at is None else "while serving"
        super().__init__(
            f"{child.name} exited unexpectedly {when} ({describe_status(child.returncode)}, "
            f"after {child.uptime():.1f}s); last lines of {child.log_path}:\n{indent(child.tail())}"
        )


class RestartsExhausted(ChildExited):
    def __init__(self, child: Child, exits: int, window_s: float, max_restarts: int) -> None:
        self.exits = exits
        SupervisorError.__init__(
            self,
            f"{child.name} exited {exits} times within {window_s:g}s ({describe_status(child.returncode)} the last "
            f"time, after {child.uptime():.1f}s): restarts exhausted (supervision.max_restarts: {max_restarts}); "
            f"last lines of {child.log_path}:\n{indent(child.tail())}")
        self.child = child


@dataclass(frozen=True)
class RestartPolicy:
    """When and how fast a child that exited is started again (``dynamo.yaml`` ``supervision``)."""

    enabled: bool = False
    max_restarts: int = 5
    window_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0

    def delay(self, n: int) -> float:
        """Back-off before the restart that follows the n-th exit (1-based) within the window."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, n - 1))


class ReadyTimeout(SupervisorError):
    def __init__(self, pending: list[Child], timeout: float) -> None:
        self.pending = pending
        parts = [f"{c.name} (log {c.log_path}):\n{indent(c.tail())}" for c in pending]
        super().__init__(f"not ready after {timeout:.0f}s: {', '.join(c.name for c in pending)}\n" + "\n".join(parts))


def indent(text: str, prefix: str = "    | ") -> str:
    return "\n".join(prefix + line for line in text.splitlines()) if text else prefix + "(empty log)"


def describe_status(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    component: str = ""
    ready: ReadyCheck | None = None
    tolerate_exit: bool = False
    stop_timeout: float = 10.0
    cwd: str | None = None
    restart: bool = True  # restarted under an enabled RestartPolicy

    def __post_init__(self) -> None:
        self.component = self.component or self.name


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    ready_at: float | None = None
    ready_info: dict[str, str] = field(default_factory=dict)  # parsed key=value of the readiness line
    stopping: bool = False
    reported: bool = False
    generation: int = 0  # 0: the first start; n: the n-th restart
    restart_at: float | None = None  # monotonic time of a pending restart (the child exited)
    _offset: int = 0
    _partial: bytes = b""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    def tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                lines = _ANSI.sub("", f.read().decode(errors="replace")).splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def new_lines(self) -> list[str]:
        """Complete log lines written since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        return [line.decode(errors="replace").rstrip("\r") for line in complete]


_READY_WORD = re.compile(r"(?<!\S)([A-Za-z_][A-Za-z0-9_]*)=(\S+)")


def _json_ready(line: str, prefix: str) -> tuple[bool, dict[str, str] | None]:
    """(the line ends with a JSON object, the fields of a JSON readiness line or None). A readiness line under
    ``DYN_LOGGING_JSONL`` is ``{"message": "<prefix> k=v ...", k: v, ...}`` (``logfmt.ready_line_text``),
    possibly after another stream's unfinished line."""
    at = line.find("{")
    while at >= 0:
        try:
            obj = json.loads(line[at:])
        except ValueError:
            at = line.find("{", at + 1)
            continue
        if isinstance(obj, dict) and str(obj.get("message", "")).startswith(prefix):
            return True, {str(k): str(v) for k, v in obj.items() if k not in ("time", "level", "target", "message")
                          and isinstance(v, (str, int, float))}
        return True, None
    return False, None


def ready_line(prefix: str) -> ReadyCheck:
    """Ready once the child's log has a line with a word starting ``prefix`` (stdout and stderr share the
    log, so another stream's unfinished line may precede it); the ``k=v`` words after it go to ready_info.
    A JSON line whose ``message`` starts with ``prefix`` (workers under ``DYN_LOGGING_JSONL``) gives its other
    fields instead."""

    def check(child: Child) -> bool:
        for line in child.new_lines():
            if "{" in line and prefix in line:
                is_json, fields = _json_ready(line, prefix)
                if fields is not None:
                    child.ready_info = fields
                    return True
                if is_json:  # another JSON log line that mentions the prefix
                    continue
            at = line.find(prefix)
            if at >= 0 and (at == 0 or line[at - 1].isspace() or not line[at - 1].isalnum()):
                # another writer's log line may follow on the same line (the Rust logger's starts with ESC)
                rest = line[at:].split("\x1b", 1)[0]
                child.ready_info = dict(m.groups() for m in _READY_WORD.finditer(rest))
                return True
        return False

    return check


_BLOCKED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCKED)  # the parent blocks them around the spawn
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_spawner_lock = threading.Lock()
_spawner_queue: queue.SimpleQueue | None = None
_spawner_thread: threading.Thread | None = None


def _spawner_loop(q: queue.SimpleQueue) -> None:
    while True:
        kw, done = q.get()
        try:
            done.set_result(subprocess.Popen(**kw))
        except BaseException as e:  # handed to the caller
            done.set_exception(e)


def _spawn_from_lasting_thread(argv: list[str], **kw) -> subprocess.Popen[bytes]:
    """Popen from one daemon thread that lives as long as this process. PR_SET_PDEATHSIG (``_die_with_parent``)
    fires when the *thread* that forked the child ends, not the process: a graph started from a short-lived
    thread (a test fixture's, a web handler's) lost its children about when that thread returned."""
    global _spawner_queue, _spawner_thread
    with _spawner_lock:
        if _spawner_thread is None or not _spawner_thread.is_alive():
            _spawner_queue = queue.SimpleQueue()
            _spawner_thread = threading.Thread(target=_spawner_loop, args=(_spawner_queue,),
                                               name="dynamo-ext-spawner", daemon=True)
            _spawner_thread.start()
        q = _spawner_queue
    done: Future[subprocess.Popen[bytes]] = Future()
    q.put(({"args": argv, **kw}, done))
    return done.result()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


EventHook = Callable[[str, "Child", str], None]


class Supervisor:
    def __init__(self, log_dir: str | Path, on_tolerated: Callable[[Child], None] | None = None,
                 policy: RestartPolicy | None = None, on_event: EventHook | None = None) -> None:  # fmt: skip
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.retired: list[Child] = []  # earlier generations of restarted children
        self.on_tolerated = on_tolerated
        self.policy = policy or RestartPolicy()
        self.on_event = on_event
        self.exits: dict[str, list[float]] = {}  # child name -> monotonic times of its unexpected exits
        self._lock = threading.RLock()

    def start(self, spec: ChildSpec) -> Child:
        with self._lock:
            if any(c.name == spec.name for c in self.children):
                raise SupervisorError(f"duplicate child name {spec.name!r}")
            child = self._spawn(spec)
            self.children.append(child)
        return child

    def _spawn(self, spec: ChildSpec, note: str = "") -> Child:
        log_path = self.log_dir / f"{spec.name}.log"
        # a stop signal between the spawn and the bookkeeping would leave an untracked child: defer it
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
        try:
            with open(log_path, "ab") as log:
                if note:
                    log.write(f"[supervisor] {note}\n".encode())
                    log.flush()
                offset = log.tell()  # a restarted child's readiness is read from here on
                proc = _spawn_from_lasting_thread(
                    spec.argv, env=spec.env, cwd=spec.cwd, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
                )  # fmt: skip
            child = Child(spec, proc, log_path, time.monotonic(), _offset=offset)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if spec.ready is None:
            child.ready_at = time.monotonic()
        return child

    def all_children(self) -> list[Child]:
        """Every process started, earlier generations of restarted children included."""
        with self._lock:
            return self.retired + self.children

    def serving(self) -> bool:
        """Every child alive and ready, no restart pending (full capacity)."""
        with self._lock:
            return all(c.alive() and c.ready_at is not None and c.restart_at is None
                       for c in self.children if not c.stopping)  # fmt: skip

    def _event(self, kind: str, child: Child, text: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, child, text)
            except Exception:  # noqa: BLE001 - a report must not break supervision
                pass

    # -- readiness ------------------------------------------------------------------------

    def poll_ready(self) -> list[Child]:
        """Update readiness; raise ChildExited for a child that died before being ready. Returns pending."""
        pending = []
        for c in self.children:
            if c.ready_at is not None or c.stopping:
                continue
            if c.spec.ready is not None and c.spec.ready(c):
                c.ready_at = time.monotonic()
                continue
            if not c.alive():
                c.reported = True
                raise ChildExited(c)
            pending.append(c)
        return pending

    def wait_ready(self, timeout: float, progress: Callable[[str], None] | None = None, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        while True:
            pending = self.poll_ready()
            self.check()
            if progress is not None:
                ready = [c.name for c in self.children if c.ready_at is not None]
                progress(f"{time.monotonic() - t0:5.1f}s ready {len(ready)}/{len(self.children)}"
                         + (f"; waiting for {', '.join(c.name for c in pending)}" if pending else ""))
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise ReadyTimeout(pending, timeout)
            time.sleep(interval)

    # -- while serving --------------------------------------------------------------------

    def check(self) -> None:
        with self._lock:
            for c in list(self.children):
                if c.stopping:
                    continue
                if c.restart_at is not None:
                    if time.monotonic() >= c.restart_at:
                        self._restart(c)
                    continue
                if c.alive():
                    if c.generation and c.ready_at is None and c.spec.ready is not None and c.spec.ready(c):
                        c.ready_at = time.monotonic()
                        self._event("ready", c, f"{c.name} ready again {c.ready_at - c.started_at:.1f}s after "
                                                f"restart {c.generation}")  # fmt: skip
                    continue
                if c.reported:
                    continue
                c.reported = True
                if self.policy.enabled and c.spec.restart:
                    self._schedule_restart(c)
                    continue
                siblings = [s for s in self.children
                            if s.spec.component == c.spec.component and s is not c and s.alive()]  # fmt: skip
                if c.spec.tolerate_exit and siblings:
                    if self.on_tolerated is not None:
                        self.on_tolerated(c)
                    continue
                raise ChildExited(c)

    def _schedule_restart(self, c: Child) -> None:
        p, now = self.policy, time.monotonic()
        hist = [t for t in self.exits.get(c.name, []) if now - t <= p.window_s] + [now]
        self.exits[c.name] = hist
        if len(hist) > p.max_restarts:
            raise RestartsExhausted(c, len(hist), p.window_s, p.max_restarts)
        delay = p.delay(len(hist))
        c.restart_at = now + delay
        when = "before it was ready" if c.ready_at is None else f"after {c.uptime():.1f}s"
        self._event("exited", c, f"{c.name} exited ({describe_status(c.returncode)}, {when}); restarting in "
                                 f"{delay:g}s (exit {len(hist)} of at most {p.max_restarts + 1} within "
                                 f"{p.window_s:g}s); last lines of {c.log_path}:\n{indent(c.tail(5))}")  # fmt: skip

    def _restart(self, old: Child) -> None:
        end = time.monotonic() + 5
        while group_members(old.pid) and time.monotonic() < end:  # leftovers of the old process group
            _killpg(old.pid, signal.SIGKILL)
            time.sleep(0.05)
        gen = old.generation + 1
        new = self._spawn(old.spec, note=f"restart {gen} of {old.name} ({describe_status(old.returncode)} before)")
        new.generation = gen
        self.children[self.children.index(old)] = new
        self.retired.append(old)
        self._event("restarted", new, f"{new.name}: restart {gen} started (pid {new.pid})")

    # -- stopping -------------------------------------------------------------------------

    def stop_all(self) -> list[tuple[str, str]]:
        """Stop every component in reverse start order; returns ``(name, how it ended)`` per child."""
        order: list[str] = []
        for c in self.children:
            if c.spec.component not in order:
                order.append(c.spec.component)
        with self._lock:
            for c in self.children:
                c.stopping = True  # no restart from here on (a check() in another thread included)
                c.restart_at = None
        results: list[tuple[str, str]] = []
        for comp in reversed(order):
            results += self.stop_group([c for c in self.children if c.spec.component == comp])
        return results

    def stop_group(self, children: list[Child]) -> list[tuple[str, str]]:
        with self._lock:  # marked under the lock: check() never restarts a child we are stopping
            for c in children:
                c.stopping = True
                c.restart_at = None
        for c in children:
            if c.alive() or group_members(c.pid):
                _killpg(c.pid, signal.SIGTERM)
        timeout = max((c.spec.stop_timeout for c in children), default=0.0)
        deadline = time.monotonic() + timeout
        how: dict[str, str] = {}
        while time.monotonic() < deadline and any(c.alive() or group_members(c.pid) for c in children):
            time.sleep(0.05)
        for c in children:
            if c.alive() or group_members(c.pid):
                _killpg(c.pid, signal.SIGKILL)
                how[c.name] = f"killed by SIGKILL after {timeout:g}s SIGTERM timeout"
        for c in children:
            try:
                c.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
                pass
            end = time.monotonic() + 5
            while group_members(c.pid) and time.monotonic() < end:
                _killpg(c.pid, signal.SIGKILL)
                time.sleep(0.05)
            how.setdefault(c.name, describe_status(c.returncode))
        return [(c.name, how[c.name]) for c in children]

    def leftovers(self) -> list[int]:
        """Live processes still in any child's process group (should be empty after stop_all)."""
        return [pid for c in self.all_children() for pid in group_members(c.pid)]
