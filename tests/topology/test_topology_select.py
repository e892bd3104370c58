"""select_transport: every kind, forced kinds, and forced kinds that cannot work."""

from __future__ import annotations

import pytest
from topo_factory import cpu_node, nvlink_node

from dynamo_ext.topology import Endpoint, allowed_transports, merge_env, nearest_nic, select_transport
from dynamo_ext.topology import baselines as B

A = nvlink_node("node-a", pid=1000)
A2 = nvlink_node("node-a", pid=1001)  # another worker process on the same node
B_ = nvlink_node("node-b", pid=1000)  # another node (same pid on purpose)
PCIE = nvlink_node("pcie-box", pid=10, nvlink=False, nics=False)
PCIE2 = nvlink_node("pcie-box", pid=11, nvlink=False, nics=False)
CPU1, CPU2 = cpu_node(pid=1), cpu_node(pid=2)


def ep(t, dev="host", pid=None):
    return Endpoint(t, t.pid if pid is None else pid, dev)


def test_same_process_is_a_local_copy_never_nixl():
    for da, db, gbps in ((0, 0, B.SAME_PROCESS_SAME_GPU_GBPS), (0, 1, B.SAME_PROCESS_NVLINK_GBPS),
                         (0, "host", B.PCIE_HOST_DEVICE_GBPS), ("host", "host", B.SAME_PROCESS_HOST_GBPS)):
        c = select_transport(ep(A, da), ep(A, db))
        assert (c.kind, c.backend, c.backends, c.expected_gbps) == ("same-process", "local", ("local",), gbps)
        assert not c.env and any("never NIXL" in n for n in c.notes)


def test_same_pid_in_another_pid_namespace_is_not_the_same_process():
    other_ns = nvlink_node("node-a", pid=1000, ns="pid:[999]")
    c = select_transport(ep(A, "host"), ep(other_ns, "host"))
    assert c.kind == "host-shm" and "posix" in c.env["UCX_TLS"]  # cma needs one pid namespace
    assert c.expected_gbps == B.HOST_SHM_POSIX_GBPS


def test_same_gpu_two_processes():
    c = select_transport(ep(A, 0), ep(A2, 0))
    assert (c.kind, c.backends, c.expected_gbps) == ("same-gpu", ("cuda_ipc", "nixl"), B.SAME_GPU_IPC_GBPS)
    assert "cuda_ipc" in c.env["UCX_TLS"] and "tcp" in c.env["UCX_TLS"].split(",")
    # a NIXL READ between GPU processes without NVLink runs over TCP unless GET zero-copy is forced on
    assert c.env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "on" == c.peer_env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"]
    assert c.nixl_params == {"ucx_error_handling_mode": "none"}


def test_nvlink_peers():
    c = select_transport(ep(A, 0), ep(A2, 1))
    assert (c.kind, c.backend, c.backends, c.expected_gbps) == ("nvlink", "cuda_ipc", ("cuda_ipc", "nixl"),
                                                                B.NVLINK_IPC_GBPS)
    assert c.nixl_params["ucx_error_handling_mode"] == "none"
    assert c.env["UCX_TLS"].split(",")[-1] == "tcp" and c.env["UCX_NET_DEVICES"] == "lo"
    assert c.agent_config == {"enable_prog_thread": False}
    assert c.nixl_choice() == {"env": c.env, "params": c.nixl_params, "agent_config": c.agent_config}
    assert not c.forced and c.reasons


def test_pcie_gpu_pair_without_nvlink():
    c = select_transport(ep(PCIE, 0), ep(PCIE2, 1))
    assert (c.kind, c.backends, c.expected_gbps) == ("pcie", ("cuda_ipc", "nixl"), B.PCIE_P2P_GBPS)
    assert any("ESTIMATE" in n for n in c.notes)


def test_gpu_to_host_of_another_process_is_nixl_and_says_it_is_slow():
    for a, b in ((ep(A, 0), ep(A2, "host")), (ep(A, "host"), ep(A2, 1))):
        c = select_transport(a, b)
        assert (c.kind, c.backend, c.backends) == ("pcie", "nixl", ("nixl",))
        # what its only backend delivers (NIXL falls to TCP): 0.35-0.72 measured, not min(PCIe, host-shm) = 10
        assert c.expected_gbps == B.NIXL_GPU_TO_FOREIGN_HOST_GBPS < 1
        assert any("0.35-0.72" in n and "TCP" in n for n in c.notes)


def test_host_shm_on_a_cpu_box():
    c = select_transport(ep(CPU1), ep(CPU2))
    assert (c.kind, c.backend, c.backends, c.expected_gbps) == ("host-shm", "shm", ("shm", "cma", "nixl", "tcp"),
                                                                B.HOST_SHM_MAPPED_GBPS)
    assert c.env == {"UCX_TLS": "cma,self,tcp", "UCX_NET_DEVICES": "lo"}
    gpu_node = select_transport(ep(A, "host"), ep(A2, "host"))  # NIXL 1.5.1 wants cuda_copy on a GPU node
    assert gpu_node.env["UCX_TLS"] == "cma,self,tcp,cuda_copy"
    assert c.agent_config == {"enable_prog_thread": False}


def test_rdma_across_nodes_picks_the_nic_nearest_each_gpu():
    c = select_transport(ep(A, 0), ep(B_, 1))
    assert (c.kind, c.backend, c.backends) == ("rdma", "nixl", ("nixl",))
    assert c.nic_a == "mlx5_0:1" and c.nic_b == "mlx5_3:1"
    assert c.env["UCX_NET_DEVICES"] == "mlx5_0:1" and c.peer_env["UCX_NET_DEVICES"] == "mlx5_3:1"
    assert c.gpudirect and c.env["UCX_IB_GPU_DIRECT_RDMA"] == "yes"
    # mlx5_3 is 200 Gb/s: the slower side bounds the pair; 25 GB/s x 0.99
    assert c.expected_gbps == pytest.approx(200 / 8 * B.RDMA_GPUDIRECT_EFFICIENCY)


def test_rdma_without_gpudirect_is_staged_and_says_so():
    b = nvlink_node("node-b", gdr=False)
    c = select_transport(ep(A, 0), ep(b, 0))
    assert c.kind == "rdma" and not c.gpudirect
    assert c.peer_env["UCX_IB_GPU_DIRECT_RDMA"] == "no"
    assert c.expected_gbps == pytest.approx(400 / 8 * B.RDMA_STAGED_EFFICIENCY)
    assert any("nvidia_peermem" in n for n in c.notes)


def test_rdma_device_override_and_host_memory():
    c = select_transport(ep(A, 0), ep(B_, "host"), rdma_device="mlx5_1")
    assert c.nic_a == "mlx5_1:1" and "cuda_copy" not in c.peer_env["UCX_TLS"]
    assert nearest_nic(A, A.gpu(1)).__getitem__(0).name == "mlx5_3"
    assert nearest_nic(cpu_node(), None) is None


def test_tcp_fallback_across_nodes_without_rdma():
    c = select_transport(ep(CPU1), ep(cpu_node("other-box", pid=1)))
    assert (c.kind, c.backends, c.expected_gbps) == ("tcp", ("nixl", "tcp"), B.TCP_CROSS_NODE_GBPS)
    assert c.env == {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "bond0"}


# -- forcing -----------------------------------------------------------------------------------------


def test_forced_kinds_that_work():
    c = select_transport(ep(A, 0), ep(A2, 1), force="tcp")
    assert (c.kind, c.forced, c.expected_gbps) == ("tcp", True, B.TCP_LOOPBACK_GBPS)
    assert c.env["UCX_TLS"] == "tcp" and "forced" in c.reasons[0]
    assert c.backends == ("tcp", "nixl")  # forced: our TCP stream first (host pools), NIXL over UCX tcp next
    c = select_transport(ep(A, 0), ep(A2, 1), force="nvlink")
    assert (c.kind, c.forced) == ("nvlink", True)
    c = select_transport(ep(A, 0), ep(A2, 1), force="pcie")  # NVLink peers kept off NVLink
    assert (c.kind, c.forced) == ("pcie", True) and "cuda_ipc" not in c.env["UCX_TLS"]
    c = select_transport(ep(A, 0), ep(A2, 1), force="rdma")  # loopback through the NICs
    assert (c.kind, c.forced) == ("rdma", True)
    c = select_transport(ep(A, 0), ep(B_, 0), force="ib")  # dynamo.yaml spelling of rdma
    assert (c.kind, c.forced) == ("rdma", True)
    c = select_transport(ep(PCIE, 0), ep(PCIE2, "host"), force="pcie")
    assert (c.kind, c.backend, c.forced) == ("pcie", "nixl", True)
    c = select_transport(ep(A, 0), ep(A, 1), force="tcp")  # one process: NIXL over tcp works (slowly)
    assert c.kind == "tcp" and c.expected_gbps == B.NIXL_ONE_PROCESS_GBPS
    c = select_transport(ep(A, 0), ep(A2, 1), force="auto")
    assert c.kind == "nvlink" and not c.forced
    c = select_transport(ep(CPU1), ep(CPU2), force="shm")  # shared memory only, no fallback
    assert (c.kind, c.backend, c.backends, c.forced) == ("host-shm", "shm", ("shm",), True)
    assert "forced" in c.reasons[0]


@pytest.mark.parametrize("a, b, force, match", [
    (ep(A, 0), ep(B_, 1), "nvlink", "different hosts"),
    (ep(A, 0), ep(B_, 1), "pcie", "different hosts"),
    (ep(A, 0), ep(A2, 0), "nvlink", "same GPU"),
    (ep(A, 0), ep(A2, "host"), "nvlink", "host memory"),
    (ep(PCIE, 0), ep(PCIE2, 1), "nvlink", "not NVLink peers"),
    (ep(A, 0), ep(A, 1), "nvlink", "one process"),
    (ep(CPU1), ep(CPU2), "pcie", "both endpoints are host memory"),
    (ep(CPU1), ep(cpu_node("x", pid=1)), "rdma", "no active RDMA port on cpu-box, x"),
    (ep(CPU1), ep(cpu_node("x", pid=1)), "shm", "one host"),
    (ep(A, 0), ep(A2, "host"), "shm", "GPU memory"),
    (ep(A, "host"), ep(nvlink_node("node-a", pid=1000, ns="pid:[999]"), "host"), "shm", "pid namespaces"),
])  # fmt: skip
def test_forced_kinds_that_cannot_work_raise(a, b, force, match):
    with pytest.raises(ValueError, match=match) as ei:
        select_transport(a, b, force=force)
    msg = str(ei.value)
    assert a.label() in msg and b.label() in msg and "allowed for this pair: auto" in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown transport 'carrier-pigeon'"):
        select_transport(ep(A, 0), ep(A2, 1), force="carrier-pigeon")
    with pytest.raises(ValueError, match="no GPU with index 5"):
        select_transport(ep(A, 5), ep(A2, 1))


def test_allowed_transports():
    assert allowed_transports(ep(A, 0), ep(A2, 1)) == ["auto", "nvlink", "pcie", "rdma", "tcp"]
    assert allowed_transports(ep(A, 0), ep(A, 1)) == ["auto", "tcp"]
    assert allowed_transports(ep(CPU1), ep(CPU2)) == ["auto", "shm", "tcp"]


def test_endpoint_of_uses_the_worker_gpu():
    assert Endpoint.of(A).device == 0 and Endpoint.of(CPU1).device == "host"
    assert Endpoint.of(A).label() == "node-a/node-a-0/pid1000/gpu0"


def test_merge_env_unions_tls_and_devices():
    c1 = select_transport(ep(A, 0), ep(A2, 1))
    c2 = select_transport(ep(A, 0), ep(B_, 0))
    env, conflicts = merge_env([c1, c2])
    assert env["UCX_NET_DEVICES"] == "lo,mlx5_0:1"
    assert set(env["UCX_TLS"].split(",")) >= {"cuda_ipc", "rc", "tcp"}
    assert conflicts == []


def test_choice_to_dict_is_plain_json():
    import json

    d = select_transport(ep(A, 0), ep(B_, 1)).to_dict()
    assert json.loads(json.dumps(d)) == d and isinstance(d["reasons"], list)
