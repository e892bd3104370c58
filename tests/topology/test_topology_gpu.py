"""On a GPU machine: the nvidia-smi path and the NVML path agree, CUDA indices match torch, and
NVLink peers (if any) give an ``nvlink`` choice. Skipped where there is no nvidia-smi."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from dynamo_ext.topology import Endpoint, collect_local_topology, select_transport

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no nvidia-smi")]


def _facts(t):
    return [(g.index, g.uuid, g.pci_bus_id, g.numa_node, tuple(sorted(g.nvlink_peers)), g.memory_mib > 0)
            for g in t.gpus]  # fmt: skip


def test_nvidia_smi_path_finds_the_gpus():
    t = collect_local_topology(gpu_libs=False)
    assert t.gpu_source == "nvidia-smi" and t.gpus, t.probe_errors
    for g in t.gpus:
        assert g.uuid.startswith("GPU-") and len(g.pci_bus_id) == 12 and g.memory_mib > 0
        for p in g.nvlink_peers:  # symmetric
            assert g.uuid in next(h for h in t.gpus if h.uuid == p).nvlink_peers


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is None, reason="no pynvml")
def test_nvml_and_nvidia_smi_agree():
    smi = collect_local_topology(gpu_libs=False)
    nvml = collect_local_topology()
    assert nvml.gpu_source == "nvml", nvml.probe_errors
    assert _facts(nvml) == _facts(smi)


def test_cuda_index_matches_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    t = collect_local_topology(0)
    by_uuid = {g.uuid: g.cuda_index for g in t.gpus}
    for i in range(torch.cuda.device_count()):
        u = str(torch.cuda.get_device_properties(i).uuid)
        assert by_uuid["GPU-" + u.removeprefix("GPU-")] == i
    assert t.gpu(t.worker_gpu).cuda_index == 0


def test_pair_choices_on_this_node():
    t = collect_local_topology()
    g = t.gpus
    assert select_transport(Endpoint(t, t.pid, g[0].index), Endpoint(t, t.pid + 1, g[0].index)).kind == "same-gpu"
    if len(g) >= 2:
        c = select_transport(Endpoint(t, t.pid, g[0].index), Endpoint(t, t.pid + 1, g[1].index))
        assert c.kind == ("nvlink" if g[1].uuid in g[0].nvlink_peers else "pcie")
