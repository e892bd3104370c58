"""Expected bandwidths and latencies per transport kind: the numbers ``select_transport`` puts in a
``TransportChoice`` and the ``LinkTable`` starts from before anything is measured on the pair.

Source unless noted: /work/shared/notes/measured-baselines.md ("MB"), measured 2026-11-22 on one
host with 2x H200 joined by NVLink (NV18), NIXL 1.5.1 + bundled UCX, 1 GiB payloads, median of 5;
and the CPU box (2 cores) runs of dynamo-nixl-integration.md §7 ("NI§7"). Values marked ESTIMATE
were not measured anywhere; a probe (``dynamo-ext topology --probe``) replaces them on the machine.
"""

from __future__ import annotations

# --- same process: a local copy, NIXL is never used -----------------------------------------------
# MB "Physical ceilings": same GPU device-to-device copy 2,099 GB/s.
SAME_PROCESS_SAME_GPU_GBPS = 2099.0
# MB "Physical ceilings": GPU0 -> GPU1 peer copy over NVLink 393 GB/s.
SAME_PROCESS_NVLINK_GBPS = 393.0
# MB "Physical ceilings": host pinned <-> GPU over PCIe 55.4 / 55.2 GB/s.
PCIE_HOST_DEVICE_GBPS = 55.2
# ESTIMATE: GPU<->GPU peer copy over PCIe (no NVLink), typical Gen4/Gen5 P2P through a switch/root.
PCIE_P2P_GBPS = 25.0
# MB "CPU-only machine": numpy.copyto on the same buffers, 13 GB/s.
SAME_PROCESS_HOST_GBPS = 13.0
# MB "Raw NIXL, two agents in ONE process": 0.3 - 0.7 GB/s, UCX moved it over tcp/lo.
NIXL_ONE_PROCESS_GBPS = 0.5

# --- same node, two processes (NIXL UCX) -----------------------------------------------------------
# MB "two processes": GPU0 -> GPU0 (other process), 1 GiB x 1, error mode none: 1,422 (best 1,613).
SAME_GPU_IPC_GBPS = 1422.0
# MB "two processes": GPU0 -> GPU1, 1 GiB x 1: 303 (peer) / 237 (none) GB/s, one run each, within
# noise; the ~300 GB/s class. Few large descriptors assumed (32 KiB x 32,768 gives 4.4 GB/s).
NVLINK_IPC_GBPS = 300.0
# MB: GPU0 -> host pinned of another process: 0.68 GB/s (falls to TCP). Never chosen; quoted in notes.
NIXL_GPU_TO_FOREIGN_HOST_GBPS = 0.68
# MB "CPU-only machine" / NI§7: 1 GiB over cma, enable_prog_thread=False both sides: 11.0 GB/s;
# 16,384 x 64 KiB: 7.4 GB/s. "~10 GB/s" on the 2-core box; a large host will do better.
HOST_SHM_CMA_GBPS = 10.0
# NI§7: UCX_TLS=posix,sysv,self,tcp (used when cma cannot work: different pid namespaces): 2.2 GB/s.
HOST_SHM_POSIX_GBPS = 2.2
# NI§7: UCX_TLS=tcp on loopback, progress thread off: 3.9 GB/s (on: 2.0).
TCP_LOOPBACK_GBPS = 3.9

# --- across nodes -----------------------------------------------------------------------------------
# MB "Published anchors": NIXL UCX over 400G InfiniBand ~49.5 GB/s = 99% of the link.
RDMA_GPUDIRECT_EFFICIENCY = 0.99
# ESTIMATE: without GPUDirect RDMA, UCX stages GPU memory through host bounce buffers.
RDMA_STAGED_EFFICIENCY = 0.7
# MB "Published anchors": NIXL UCX over 100G TCP: 0.55 GB/s.
TCP_CROSS_NODE_GBPS = 0.55

# --- latency (microseconds, one small transfer, caller polling) ------------------------------------
# MB: per-descriptor cost about 7.5 us (NVLink/IPC paths). NI§7: send_notif p50 35 us with the
# progress thread off; notification after DONE ~1 us. The rest are ESTIMATES.
LATENCY_US = {
    "same-process": 10.0,  # ESTIMATE: a CUDA copy launch / memcpy call
    "same-gpu": 7.5,  # MB per-descriptor cost
    "nvlink": 7.5,  # MB per-descriptor cost
    "pcie": 15.0,  # ESTIMATE
    "host-shm": 35.0,  # NI§7 send_notif p50, progress thread off
    "rdma": 10.0,  # ESTIMATE: a few us wire + 7.5 us per descriptor
    "tcp": 100.0,  # ESTIMATE
}
