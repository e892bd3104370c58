"""Expected bandwidths and latencies per transport kind: the numbers ``select_transport`` puts in a
``TransportChoice`` (and ``dynamo-ext topology --probe`` prints next to what it measures), and the
``LinkTable`` starts from before anything is measured on the pair. Each expectation is what the pair's
FIRST backend delivers for the workload that matters (scattered KV blocks), not a link's raw ceiling: it
seeds routing costs and pull deadlines (``4 x bytes / expected``), so an optimistic figure means timeouts.

Sources (cited next to each constant):
  MB   /work/shared/notes/measured-baselines.md (2x H200 NV18, NIXL 1.5.1, 1 GiB, median of 5; CPU box)
  GM   /work/shared/notes/gpu-machine.md (one H200 2026-12, 4x H200 2026-11: bench transfer, topology --probe)
  NI7  /work/shared/notes/dynamo-nixl-integration.md section 7 (NIXL on the 2-core CPU box)
  TP   benchmarks/results/transfer-perf.md (this repository: limits, predictions, outcomes per path)
  SHM  benchmarks/results/transfer-cpu-shm-*.md (this repository: the shm backend on the 2-core box)
Values marked ESTIMATE were not measured anywhere; ``dynamo-ext topology --probe`` measures the machine.
"""

from __future__ import annotations

# --- same process: a local copy, NIXL is never used -----------------------------------------------
# MB "Physical ceilings": same GPU device-to-device copy 2,099 GB/s (GM: 2,018-2,053 on one H200).
SAME_PROCESS_SAME_GPU_GBPS = 2099.0
# MB "Physical ceilings": GPU0 -> GPU1 peer copy over NVLink 393 GB/s (GM: 388-391).
SAME_PROCESS_NVLINK_GBPS = 393.0
# MB "Physical ceilings": host pinned <-> GPU over PCIe 55.4 / 55.2 GB/s (GM: GPU -> host 55).
PCIE_HOST_DEVICE_GBPS = 55.2
# ESTIMATE: GPU<->GPU peer copy over PCIe (no NVLink), typical Gen4/Gen5 P2P through a switch/root.
PCIE_P2P_GBPS = 25.0
# MB "CPU-only machine": numpy.copyto on the same buffers, 13 GB/s.
SAME_PROCESS_HOST_GBPS = 13.0
# MB "Raw NIXL, two agents in ONE process": 0.3 - 0.7 GB/s, UCX moved it over tcp/lo.
NIXL_ONE_PROCESS_GBPS = 0.5

# --- same node, two processes ----------------------------------------------------------------------
# The first backend of same-gpu is cuda_ipc (ours). GM "CUDA IPC (ours): same GPU 330-480" (1 GiB of
# scattered KV; 885-940 with plan and row caches); TP run 2 topology --probe (256 MiB): 322-427. Was 1,422,
# NIXL's raw single 1 GiB descriptor (MB), a ceiling no KV transfer reaches (NIXL_SAME_GPU_RAW_GBPS).
SAME_GPU_IPC_GBPS = 400.0
# MB "two processes": GPU0 -> GPU0 (other process), 1 GiB x 1 descriptor, raw NIXL: 1,422 (best 1,613).
NIXL_SAME_GPU_RAW_GBPS = 1422.0
# The first backend of nvlink is cuda_ipc. GM "cross GPU 219-280" (1 GiB scattered KV; 280 with caches); TP
# run 2 probe (256 MiB): 130-187. Was 300 = NIXL's raw single descriptor (MB: 303 / 237 GB/s, error mode
# peer / none), not what scattered KV gets (MB: 32 KiB x 32,768 descriptors through NIXL: 4.4 GB/s).
NVLINK_IPC_GBPS = 220.0
# MB: GPU0 -> host pinned of another process: 0.68 (1 GiB x 1) / 0.72 (32 KiB x 32,768) GB/s: NIXL falls to
# TCP; GM: 0.4-0.5; TP: a host worker pulling from a GPU peer through NIXL, 0.35. What the gpu <-> foreign
# host pair's only backend (nixl) delivers: its expectation (it was min(PCIe, host-shm) = 10, 20x too high).
NIXL_GPU_TO_FOREIGN_HOST_GBPS = 0.5
# GM "Zero-copy owner copy GPU -> host: 48"; TP run 2: 48.4 (target 45 met), probe (256 MiB) 43.6-47.7:
# what ``topology --probe`` measures for GPUi -> host (the owner's copy into its own pinned host tier).
OWNER_COPY_GPU_TO_HOST_GBPS = 48.0
# Backend cma (ours, process_vm_readv): TP "host->host (e)": 7.3-8.6 GB/s on the 2-core box (59-62% of
# memcpy, 1 GiB scattered), 13.1 with 4 threads on the 32-core H200 host; TP product pull: 15.4-18.7 on the
# 2-core box (READ, 2 threads). NIXL over UCX cma (NI7 / MB "CPU-only machine"): 11.0 (1 GiB x 1), 7.4 (64 KiB
# descriptors). ~10 on the 2-core box; a large host does better.
HOST_SHM_CMA_GBPS = 10.0
# Backend shm (pools in shared memory, the peer's mapped once; one memcpy per merged run in a compiled loop):
# SHM transfer-cpu-shm.md, the 2-core box, 1 GiB of scattered KV, 3 runs: READ 1 thread 17.6-20.1 GB/s
# (0.82-0.94 x memcpy; cma x1 in the same runs 15.1-15.6), 2 threads 17.7-24.1, the product's pull 21.2-34.3.
# 15: below the 1-thread median (18.9), for deadlines and routing.
HOST_SHM_MAPPED_GBPS = 15.0
# NI7: UCX_TLS=posix,sysv,self,tcp (used when cma cannot work: different pid namespaces): 2.2 GB/s.
HOST_SHM_POSIX_GBPS = 2.2
# MB "CPU-only machine" / NI7: UCX_TLS=tcp on loopback, progress thread off: 3.9 GB/s (on: 2.0).
TCP_LOOPBACK_GBPS = 3.9

# --- across nodes -----------------------------------------------------------------------------------
# MB "Published anchors": NIXL UCX over 400G InfiniBand ~49.5 GB/s = 99% of the link.
RDMA_GPUDIRECT_EFFICIENCY = 0.99
# ESTIMATE: without GPUDirect RDMA, UCX stages GPU memory through host bounce buffers.
RDMA_STAGED_EFFICIENCY = 0.7
# MB "Published anchors": NIXL UCX over 100G TCP: 0.55 GB/s.
TCP_CROSS_NODE_GBPS = 0.55

# --- latency (microseconds, one small transfer, caller polling) ------------------------------------
# MB: per-descriptor cost about 7.5 us (NVLink/IPC paths). NI7: send_notif p50 35 us with the
# progress thread off; notification after DONE ~1 us. The rest are ESTIMATES.
LATENCY_US = {
    "same-process": 10.0,  # ESTIMATE: a CUDA copy launch / memcpy call
    "same-gpu": 7.5,  # MB per-descriptor cost
    "nvlink": 7.5,  # MB per-descriptor cost
    "pcie": 15.0,  # ESTIMATE
    "host-shm": 35.0,  # NI7 send_notif p50, progress thread off
    "rdma": 10.0,  # ESTIMATE: a few us wire + 7.5 us per descriptor
    "tcp": 100.0,  # ESTIMATE
}
