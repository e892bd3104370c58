"""NIXL POSIX file I/O: bytes between a registered host pool and a registered file pool.

Protocol::

    io = NixlFileIO("kv-disk-0")                 one NIXL agent with only the POSIX backend (no UCX, so
                                                 it does not disturb the process's transfer agent)
    io.register(host_pool)                       once: register_memory([(addr, nbytes, 0, "")], "DRAM")
    io.register(file_pool)                       once: register_memory([(0, nbytes, fd, name)], "FILE")
    io.write(host_pool, file_pool, descs)        DRAM -> FILE: initialize_xfer("WRITE", dram, file, <itself>)
    io.read(host_pool, file_pool, descs)         FILE -> DRAM: the same with "READ"
    io.close()                                   deregisters everything

``descs``: ``(host_offset, file_offset, nbytes)`` triples (an (N, 3) int64 array, a plan's
``DescriptorArray``, or tuples), offsets from the start of each pool, bounds-checked before NIXL sees
them. The remote agent of every transfer is the agent itself (NIXL's POSIX backend is local).
Calls are synchronous: post, then poll ``check_xfer_state`` until ``DONE`` (or ``deadline_s``).
Errors: ``UnregisteredMemory``, ``InvalidBlocks``, ``TransferTimeout``, ``BackendError``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .backend import as_triples
from .errors import BackendError, InvalidBlocks, TransferTimeout, UnregisteredMemory
from .pool import KvPool, MemoryKind

__all__ = ["NixlFileIO"]


class NixlFileIO:
    def __init__(self, agent_name: str = "kv-file-io", *, posix_params: dict[str, str] | None = None) -> None:
        from nixl._api import nixl_agent, nixl_agent_config  # noqa: PLC0415

        self.agent_name = agent_name
        self.agent = nixl_agent(agent_name, nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False,
                                                               backends=[]))
        params = dict(self.agent.get_plugin_params("POSIX"))
        params.update(posix_params or {})
        try:
            self.agent.create_backend("POSIX", params)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"creating NIXL POSIX backend failed: {e}") from e
        self._reg: dict[str, tuple[KvPool, Any]] = {}

    def register(self, pool: KvPool) -> None:
        if pool.kind not in (MemoryKind.HOST, MemoryKind.FILE):
            raise ValueError(f"NixlFileIO moves host <-> file; pool {pool.name!r} is {pool.kind.value}")
        if pool.name in self._reg:
            if self._reg[pool.name][0] is not pool:
                raise ValueError(f"a different pool named {pool.name!r} is already registered")
            return
        mem = "FILE" if pool.kind is MemoryKind.FILE else "DRAM"
        try:
            reg = self.agent.register_memory([pool.nixl_reg_tuple()], mem)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"registering {pool!r} with NIXL POSIX failed: {e}") from e
        self._reg[pool.name] = (pool, reg)

    def _require(self, pool: KvPool, kind: MemoryKind) -> None:
        if pool.kind is not kind:
            raise ValueError(f"pool {pool.name!r} is {pool.kind.value}, expected {kind.value}")
        if self._reg.get(pool.name, (None,))[0] is not pool:
            raise UnregisteredMemory(f"pool {pool.name!r} is not registered with {self.agent_name!r}")

    def write(self, host: KvPool, file: KvPool, descs: Any, *, deadline_s: float = 30.0) -> int:
        """Host -> file. Returns bytes moved."""
        return self._xfer("WRITE", host, file, descs, deadline_s)

    def read(self, host: KvPool, file: KvPool, descs: Any, *, deadline_s: float = 30.0) -> int:
        """File -> host. Returns bytes moved."""
        return self._xfer("READ", host, file, descs, deadline_s)

    def _xfer(self, op: str, host: KvPool, file: KvPool, descs: Any, deadline_s: float) -> int:
        self._require(host, MemoryKind.HOST)
        self._require(file, MemoryKind.FILE)
        d = as_triples(descs)
        if len(d) == 0:
            return 0
        ho, fo, n = d[:, 0], d[:, 1], d[:, 2]
        bad = (n <= 0) | (ho < 0) | (fo < 0) | (ho + n > host.nbytes) | (fo + n > file.nbytes)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidBlocks(f"descriptor {tuple(int(x) for x in d[i])} falls outside the pools "
                                f"({host.nbytes} B host, {file.nbytes} B file)")
        lt = np.stack([ho + host.addr, n, np.full_like(n, host.device_id)], axis=1)
        ft = np.stack([fo, n, np.full_like(n, file.device_id)], axis=1)
        a = self.agent
        try:
            h = a.initialize_xfer(op, a.get_xfer_descs(lt, "DRAM"), a.get_xfer_descs(ft, "FILE"), self.agent_name)
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"NIXL POSIX {op} setup failed: {e}") from e
        try:
            state = a.transfer(h)
            end = time.monotonic() + deadline_s
            polls = 0
            while state not in ("DONE", "ERR"):
                if time.monotonic() > end:
                    raise TransferTimeout(f"NIXL POSIX {op} of {int(n.sum())} B not done after {deadline_s}s")
                polls += 1
                time.sleep(0 if polls < 100 else 0.0002)  # spin briefly, then back off
                state = a.check_xfer_state(h)
            if state == "ERR":
                raise BackendError(f"NIXL POSIX {op} reported ERR")
        except (TransferTimeout, BackendError):
            raise
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"NIXL POSIX {op} failed: {e}") from e
        finally:
            try:
                a.release_xfer_handle(h)
            except Exception:  # noqa: BLE001
                pass
        return int(n.sum())

    def close(self) -> None:
        for _pool, reg in self._reg.values():
            try:
                self.agent.deregister_memory(reg)
            except Exception:  # noqa: BLE001
                pass
        self._reg.clear()
