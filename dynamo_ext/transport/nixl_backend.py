"""NixlBackend: TransferBackend over NIXL 1.5.x (UCX; POSIX for file pools).

Protocol::

    be = NixlBackend("prefill-0", {"params": {"ucx_error_handling_mode": "peer"},
                                    "env": {"UCX_TLS": "cma,tcp,self", "UCX_NET_DEVICES": "lo"}})
        -> sets the UCX env (before the agent exists: UCX reads it once), creates the agent with
           enable_prog_thread=False (1.5-2x faster on small hosts; we poll instead)
    be.register_pool(pool)           -> agent.register_memory([(addr, nbytes, dev, "")], "DRAM"|"VRAM"|"FILE")
    be.local_peer_info()             -> PeerInfo(agent_metadata=agent.get_agent_metadata(), pools=[...])
    be.add_peer(info)                -> agent.add_remote_agent(info.agent_metadata)
    be.post(op, pool, peer, remote, triples, notif)
                                     -> get_xfer_descs(local tuples) / get_xfer_descs(remote tuples)
                                        initialize_xfer("READ"|"WRITE", ..., notif) ; transfer(h)
    req.poll()                       -> check_xfer_state(h): "DONE" | "PROC" | "ERR"
    req.cancel()                     -> release_xfer_handle(h) (NIXL aborts an active transfer)
    target: be.progress(); be.get_notifs()   -> agent.get_new_notifs()
    file pools: register_pool(KvPool.open_file(...)) creates the POSIX backend; transfer.copy(host_pool,
                file_pool, ..., backend=be) posts WRITE/READ with this agent as its own remote (DRAM <-> FILE)

Remote descriptor lists are built from plain (addr, nbytes, dev) tuples, never from
get_serialized_descs (that pickles). Errors: nixlRemoteDisconnectError -> PeerUnreachable,
nixlNotFoundError -> PeerUnreachable (peer unknown to the agent), anything else -> BackendError;
an "ERR" state -> BackendError. Never create two agents in one process: UCX then silently uses TCP.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from .backend import Op, TransferBackend, XferRequest
from .errors import BackendError, PeerUnreachable
from .peer import PeerInfo
from .pool import NIXL_MEM_TYPE, KvPool, MemoryKind, PoolDescriptor

_AGENTS_IN_PROCESS: list[str] = []


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401, PLC0415

        return True
    except Exception:
        return False


def map_nixl_error(e: BaseException, peer: str | None, what: str) -> Exception:
    """Translate a NIXL binding exception into the transport's typed errors."""
    kind = type(e).__name__
    if kind == "nixlRemoteDisconnectError":
        return PeerUnreachable(f"{what}: peer {peer!r} disconnected ({e})")
    if kind == "nixlNotFoundError":
        return PeerUnreachable(f"{what}: peer {peer!r} is not known to the NIXL agent (removed or never added) ({e})")
    if kind == "nixlCancelledError":
        return BackendError(f"{what}: cancelled ({e})")
    return BackendError(f"{what}: {kind}: {e}")


class _NixlRequest(XferRequest):
    def __init__(self, be: "NixlBackend", handle: Any, peer: str) -> None:
        self._be, self._h, self._peer = be, handle, peer
        self._done = False

    def poll(self) -> bool:
        if self._done:
            return True
        if self._h is None:
            raise BackendError("transfer request was cancelled")
        try:
            state = self._be.agent.check_xfer_state(self._h)
        except Exception as e:  # noqa: BLE001 - nixl binding errors have no common base we can import lazily
            self.cancel()
            raise map_nixl_error(e, self._peer, "check_xfer_state") from e
        if state == "DONE":
            self._done = True
            self.cancel()
            return True
        if state == "ERR":
            self.cancel()
            raise BackendError(f"NIXL reported ERR for a transfer with peer {self._peer!r}")
        return False

    def cancel(self) -> None:
        h, self._h = self._h, None
        if h is None:
            return
        try:
            self._be.agent.release_xfer_handle(h)
        except Exception:  # noqa: BLE001 - best effort: NIXL keeps it in its leak list
            pass


class NixlBackend(TransferBackend):
    name = "nixl"
    # deadline basis without a measured bandwidth: NIXL's worst measured path (GPU -> host of another
    # process, TCP underneath) ran at 0.42 GB/s; callers pass expected_gbps from topology/ when known
    default_gbps = 0.5

    def __init__(self, agent_name: str, choice: dict[str, Any] | None = None, *,
                 enable_prog_thread: bool = False, backends: Sequence[str] = ("UCX",)) -> None:
        super().__init__(agent_name)
        # without NIXL's progress thread, check_xfer_state drives UCX: keep polling (yield-only)
        self.poll_interval_s = 0.0005 if enable_prog_thread else 0.0
        choice = dict(choice or {})
        for k, v in (choice.get("env") or {}).items():
            os.environ[str(k)] = str(v)
        if _AGENTS_IN_PROCESS:
            # Allowed (the probe of one process needs it) but loud: two agents in one process use TCP.
            import warnings  # noqa: PLC0415

            warnings.warn(f"NIXL agent {agent_name!r} shares a process with {_AGENTS_IN_PROCESS}: "
                          "transfers between them go over TCP loopback", RuntimeWarning, stacklevel=2)
        from nixl._api import nixl_agent, nixl_agent_config  # noqa: PLC0415

        self.agent = nixl_agent(agent_name, nixl_agent_config(enable_prog_thread=enable_prog_thread,
                                                              enable_listen_thread=False, backends=[]))
        params = {str(k): str(v) for k, v in (choice.get("params") or {}).items()}
        self._backends = list(choice.get("backends") or backends)
        try:
            for b in self._backends:
                init = dict(self.agent.get_plugin_params(b))
                init.update(params if b == "UCX" else {})
                self.agent.create_backend(b, init)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"creating NIXL backends {self._backends} failed: {e}") from e
        self._reg: dict[str, Any] = {}
        _AGENTS_IN_PROCESS.append(agent_name)
        self._closed = False

    # -- registration --------------------------------------------------------------------------
    def _register(self, pool: KvPool) -> None:
        try:
            if pool.kind is MemoryKind.FILE and "POSIX" not in self._backends:
                self.agent.create_backend("POSIX", dict(self.agent.get_plugin_params("POSIX")))
                self._backends.append("POSIX")
                # host pools registered before POSIX existed must be known to it too (DRAM <-> FILE)
                for p in self._pools.values():
                    if p.kind is MemoryKind.HOST:
                        self._reg[p.name + "#posix"] = self.agent.register_memory(
                            [p.nixl_reg_tuple()], "DRAM", backends=["POSIX"])
            self._reg[pool.name] = self.agent.register_memory([pool.nixl_reg_tuple()], NIXL_MEM_TYPE[pool.kind])
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"registering pool {pool.name!r} with NIXL failed: {e}") from e

    supports_self = True  # host <-> file pools of this agent (NIXL POSIX: the remote agent is itself)

    def _agent_metadata(self) -> bytes:
        return bytes(self.agent.get_agent_metadata())

    # -- peers ---------------------------------------------------------------------------------------
    def _connect(self, info: PeerInfo) -> None:
        if not info.agent_metadata:
            raise PeerUnreachable(f"peer {info.agent_name!r} sent no NIXL agent metadata")
        try:
            name = self.agent.add_remote_agent(bytes(info.agent_metadata))
        except Exception as e:  # noqa: BLE001
            raise PeerUnreachable(f"add_remote_agent({info.agent_name!r}) failed: {e}") from e
        if isinstance(name, bytes):
            name = name.decode()
        if name != info.agent_name:
            raise PeerUnreachable(f"NIXL metadata names agent {name!r}, PeerInfo says {info.agent_name!r}")

    def _disconnect(self, name: str) -> None:
        try:
            self.agent.remove_remote_agent(name)
        except Exception:  # noqa: BLE001
            pass

    # -- transfers -----------------------------------------------------------------------------------
    def _post(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, descs: np.ndarray,
              notif: bytes) -> XferRequest:
        n = len(descs)
        lt = np.empty((n, 3), dtype=np.int64)
        lt[:, 0] = descs[:, 0] + local.addr
        lt[:, 1] = descs[:, 2]
        lt[:, 2] = local.device_id
        rt = np.empty((n, 3), dtype=np.int64)
        rt[:, 0] = descs[:, 1] + remote.addr
        rt[:, 1] = descs[:, 2]
        rt[:, 2] = remote.device_id
        try:
            lx = self.agent.get_xfer_descs(lt, NIXL_MEM_TYPE[local.kind])
            rx = self.agent.get_xfer_descs(rt, NIXL_MEM_TYPE[remote.kind])
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"building NIXL descriptor lists failed: {e}") from e
        try:
            h = self.agent.initialize_xfer(op.upper(), lx, rx, peer, notif or b"")
        except Exception as e:  # noqa: BLE001
            raise map_nixl_error(e, peer, "initialize_xfer") from e
        req = _NixlRequest(self, h, peer)
        try:
            state = self.agent.transfer(h)
        except Exception as e:  # noqa: BLE001
            req.cancel()
            raise map_nixl_error(e, peer, "transfer") from e
        if state == "ERR":
            req.cancel()
            raise BackendError(f"NIXL transfer to {peer!r} returned ERR when posted")
        if state == "DONE":
            req.poll()
        return req

    def _pull_notifs(self) -> None:
        try:
            new = self.agent.get_new_notifs()
        except Exception:  # noqa: BLE001
            return
        for k, v in new.items():
            self._notifs.setdefault(k, []).extend(v)

    def send_notif(self, peer: str, msg: bytes) -> None:
        self.peer(peer)
        try:
            self.agent.send_notif(peer, msg)
        except Exception as e:  # noqa: BLE001
            raise map_nixl_error(e, peer, "send_notif") from e

    def close_sync(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in list(self._peers):
            self.remove_peer(name)
        for reg in self._reg.values():
            try:
                self.agent.deregister_memory(reg)
            except Exception:  # noqa: BLE001
                pass
        self._reg.clear()
        if self.agent_name in _AGENTS_IN_PROCESS:
            _AGENTS_IN_PROCESS.remove(self.agent_name)
