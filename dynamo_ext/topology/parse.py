"""Pure parsers for the text that hardware probes return (nvidia-smi, /sys, /proc, env vars).

Every function here takes a string and returns plain data; none reads files or runs tools, so each
is unit-tested on captured sample text (tests/topology/samples/). ``collect.py`` does the I/O.

- ``parse_gpu_query_csv``  ``nvidia-smi --query-gpu=[index,]uuid,pci.bus_id,name,memory.total
  --format=csv,noheader``
- ``parse_topo_matrix``    ``nvidia-smi topo -m``: NVLink peers (NV#), GPU<->NIC PCI affinity
  (PIX/PXB/PHB/NODE/SYS), NUMA affinity, NIC legend
- ``parse_ib_rate`` / ``parse_port_state``  /sys/class/infiniband/<dev>/ports/<n>/{rate,state}
- ``parse_loaded_modules``  /proc/modules
- ``parse_default_route_iface``  /proc/net/route
- ``cuda_visible_map``      CUDA_VISIBLE_DEVICES -> cuda:N for each physical GPU
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def normalize_pci_bus_id(bus_id: str | bytes) -> str:
    """``00000000:18:00.0`` (NVML/nvidia-smi) -> ``0000:18:00.0`` (sysfs), lower case."""
    if isinstance(bus_id, bytes):
        bus_id = bus_id.decode(errors="replace")
    s = bus_id.strip().lower()
    parts = s.split(":")
    if len(parts) == 3:
        dom = parts[0][-4:].rjust(4, "0")
        return f"{dom}:{parts[1]}:{parts[2]}"
    if len(parts) == 2:  # bus:dev.fn without a domain
        return f"0000:{parts[0]}:{parts[1]}"
    return s


def parse_int_or_none(text: str | None) -> int | None:
    """'0' -> 0; '-1', 'N/A', '', '0-1' -> None (sysfs numa_node is -1 when unknown)."""
    if text is None:
        return None
    t = text.strip()
    if re.fullmatch(r"\d+", t):
        return int(t)
    return None


def parse_memory_mib(text: str) -> int:
    """'143771 MiB' -> 143771; '[N/A]' -> 0."""
    m = re.match(r"\s*(\d+)\s*(MiB|GiB|KiB)?", text)
    if not m:
        return 0
    v = int(m.group(1))
    unit = m.group(2) or "MiB"
    return {"MiB": v, "GiB": v * 1024, "KiB": v // 1024}[unit]


@dataclass(frozen=True)
class GpuRow:
    index: int
    uuid: str
    pci_bus_id: str
    name: str
    memory_mib: int


def parse_gpu_query_csv(text: str) -> list[GpuRow]:
    """Rows of ``--query-gpu=index,uuid,pci.bus_id,name,memory.total`` (index optional: when the
    first column is a UUID, the line number is the index, as nvidia-smi lists GPUs in index order).
    Lines that do not parse are skipped."""
    rows: list[GpuRow] = []
    lines = [ln for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    for n, rec in enumerate(csv.reader(lines, skipinitialspace=True)):
        rec = [c.strip() for c in rec]
        if len(rec) >= 5 and rec[0].isdigit():
            idx, uuid, bus, name, mem = int(rec[0]), rec[1], rec[2], rec[3], rec[4]
        elif len(rec) >= 4 and rec[0].startswith("GPU-"):
            idx, uuid, bus, name, mem = n, rec[0], rec[1], rec[2], rec[3]
        else:
            continue
        if not uuid.startswith(("GPU-", "MIG-")):
            continue
        rows.append(GpuRow(idx, uuid, normalize_pci_bus_id(bus), name, parse_memory_mib(mem)))
    return rows


@dataclass
class TopoMatrix:
    """``nvidia-smi topo -m`` as data. ``cells[row][col]`` is the code (``X``, ``NV18``, ``PIX``...)."""

    columns: list[str] = field(default_factory=list)  # device columns: GPU0.., NIC0.. (or mlx5_0..)
    cells: dict[str, dict[str, str]] = field(default_factory=dict)
    numa: dict[str, int | None] = field(default_factory=dict)  # GPU label -> NUMA affinity
    nic_legend: dict[str, str] = field(default_factory=dict)  # NIC0 -> mlx5_0

    def gpu_labels(self) -> list[str]:
        return [c for c in self.columns if re.fullmatch(r"GPU\d+", c)]

    def nic_name(self, label: str) -> str:
        return self.nic_legend.get(label, label)

    def nic_labels(self) -> list[str]:
        return [c for c in self.columns if not re.fullmatch(r"GPU\d+", c)]

    def nvlink_peers(self) -> dict[int, list[int]]:
        """GPU index -> indices of GPUs joined to it by NVLink (code ``NV#``)."""
        out: dict[int, list[int]] = {}
        for row in self.gpu_labels():
            peers = [
                int(col[3:]) for col in self.gpu_labels()
                if col != row and self.cells.get(row, {}).get(col, "").startswith("NV")
            ]  # fmt: skip
            out[int(row[3:])] = peers
        return out

    def gpu_nic_affinity(self) -> dict[int, dict[str, str]]:
        """GPU index -> {NIC device name: PIX|PXB|PHB|NODE|SYS}."""
        out: dict[int, dict[str, str]] = {}
        for row in self.gpu_labels():
            out[int(row[3:])] = {
                self.nic_name(col): self.cells.get(row, {}).get(col, "") for col in self.nic_labels()
            }
        return out

    def gpu_numa(self) -> dict[int, int | None]:
        return {int(k[3:]): v for k, v in self.numa.items() if re.fullmatch(r"GPU\d+", k)}


def _split_cells(line: str) -> list[str]:
    if "\t" in line:
        return [t.strip() for t in line.split("\t") if t.strip()]
    return line.split()


def parse_topo_matrix(text: str) -> TopoMatrix:
    """Parse ``nvidia-smi topo -m``. Tolerates ANSI codes in the header, tab or space separation,
    old outputs that name NICs directly (``mlx5_0`` columns) and new ones with a NIC legend."""
    m = TopoMatrix()
    lines = _ANSI.sub("", text).splitlines()
    header_i = None
    for i, ln in enumerate(lines):
        toks = _split_cells(ln)
        if toks and toks[0].startswith("GPU") and re.fullmatch(r"GPU\d+", toks[0]) and not ln.startswith("GPU"):
            header_i = i  # the header line is indented; rows start with their label
            break
        if toks and re.fullmatch(r"GPU\d+", toks[0]) and len(toks) > 1 and re.fullmatch(r"GPU\d+", toks[1]):
            header_i = i
            break
    if header_i is None:
        return m
    header = _split_cells(lines[header_i])
    cols: list[str] = []
    for t in header:
        if t.startswith("CPU") or t.startswith("NUMA") or t == "Affinity":
            break
        cols.append(t)
    m.columns = cols
    for ln in lines[header_i + 1 :]:
        toks = _split_cells(ln)
        if not toks or toks[0] not in cols:
            if toks and toks[0].rstrip(":") in ("Legend", "NIC"):
                break
            continue
        label = toks[0]
        vals = toks[1 : 1 + len(cols)]
        m.cells[label] = dict(zip(cols, vals, strict=False))
        rest = toks[1 + len(cols) :]
        if re.fullmatch(r"GPU\d+", label):
            # rest = [CPU affinity, NUMA affinity, GPU NUMA ID]; NUMA may be absent on old drivers
            m.numa[label] = parse_int_or_none(rest[1]) if len(rest) >= 2 else None
    for ln in lines:
        lm = re.match(r"\s*(NIC\d+)\s*:\s*(\S+)\s*$", ln)
        if lm:
            m.nic_legend[lm.group(1)] = lm.group(2)
    return m


def parse_ib_rate(text: str) -> float | None:
    """``/sys/class/infiniband/mlx5_0/ports/1/rate``: '400 Gb/sec (4X NDR)' -> 400.0 (Gbit/s)."""
    m = re.match(r"\s*([\d.]+)\s*Gb/sec", text)
    return float(m.group(1)) if m else None


def parse_port_state(text: str) -> str:
    """'4: ACTIVE' -> 'ACTIVE'; '1: DOWN' -> 'DOWN'."""
    t = text.strip()
    return t.split(":", 1)[1].strip() if ":" in t else t


def parse_loaded_modules(text: str) -> set[str]:
    """/proc/modules -> module names ('nvidia_peermem 16384 0 - Live 0x0' -> 'nvidia_peermem')."""
    return {ln.split()[0] for ln in text.splitlines() if ln.strip()}


def parse_default_route_iface(text: str) -> str | None:
    """/proc/net/route -> the interface of the default route with the lowest metric."""
    best: tuple[int, str] | None = None
    for ln in text.splitlines()[1:]:
        f = ln.split()
        if len(f) < 8 or f[1] != "00000000" or f[7] != "00000000":
            continue
        try:
            metric = int(f[6])
        except ValueError:
            continue
        if best is None or metric < best[0]:
            best = (metric, f[0])
    return best[1] if best else None


def cuda_visible_map(env_value: str | None, gpus: list[tuple[int, str]]) -> dict[int, int]:
    """Physical GPU index -> CUDA index (``cuda:N``) under ``CUDA_VISIBLE_DEVICES``.

    ``gpus`` is [(nvidia-smi index, UUID)]. Unset: every GPU, CUDA index = physical index (true under
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; the collector checks against torch when it is loaded). Entries
    are indices or UUID prefixes (``GPU-3f2a``); like CUDA, enumeration stops at the first entry that
    matches nothing, is ambiguous, repeats, or names a MIG instance.
    """
    if env_value is None:
        return {idx: idx for idx, _ in gpus}
    out: dict[int, int] = {}
    for entry in (e.strip() for e in env_value.split(",")):
        if not entry:
            break
        if re.fullmatch(r"\d+", entry):
            match = [i for i, _ in gpus if i == int(entry)]
        elif entry.startswith("GPU-"):
            match = [i for i, u in gpus if u.startswith(entry)]
        else:  # MIG-..., negative numbers, junk
            break
        if len(match) != 1 or match[0] in out:
            break
        out[match[0]] = len(out)
    return out
