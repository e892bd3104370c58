"""scripts/gpu_run.sh and the manifest of scripts/gpu_bundle.sh, without building the real bundle (that downloads).

gpu_run.sh runs here with a PATH of only the tools it needs (no etcd / nats-server) and a python without
site-packages (``-S``), against: no bundle folder, a fake bundle (one site archive with a module, one bin archive
with two fake servers), the same bundle damaged, and a bundle built for another Python. Every missing piece must
come out as a ``MISSING:`` line and the command must still run with the script's environment.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_RUN = ROOT / "scripts" / "gpu_run.sh"
TOOLS = ("bash", "awk", "basename", "cat", "cmp", "cp", "cut", "date", "dirname", "grep", "head", "mkdir", "rm",
         "sed", "sha256sum", "stat", "tar", "true", "wc", "xz")  # fmt: skip
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"

# -- the manifest format (documented in scripts/gpu_bundle.sh) -------------------------------------------------------
HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_manifest(text: str) -> dict:
    """Parse manifest.txt strictly; raise ValueError naming the first bad line."""
    m: dict = {"wheels": {}, "debs": {}, "binaries": {}, "archives": {}}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        kind, *f = line.split(" ")

        def need(count: int, ok: bool = True) -> None:
            if len(f) != count or not ok:
                raise ValueError(f"line {n}: bad {kind!r} record: {line!r}")

        if kind == "format":
            need(1, f == ["1"] if f else False)
            m["format"] = int(f[0])
        elif kind == "python":
            need(1, bool(f) and re.fullmatch(r"3\.\d+", f[0]) is not None)
            m["python"] = f[0]
        elif kind == "platform":
            need(1)
            m["platform"] = f[0]
        elif kind == "wheel":
            need(5, len(f) == 5 and f[2].endswith(".whl") and HEX64.fullmatch(f[3]) is not None)
            m["wheels"][f[0]] = {"version": f[1], "file": f[2], "sha256": f[3], "tags": f[4]}
        elif kind == "deb":
            need(4, len(f) == 4 and f[2].endswith(".deb") and HEX64.fullmatch(f[3]) is not None)
            m["debs"][f[0]] = {"version": f[1], "file": f[2], "sha256": f[3]}
        elif kind == "binary":
            need(3, len(f) == 3 and HEX64.fullmatch(f[2]) is not None)
            m["binaries"][f[0]] = {"version": f[1], "sha256": f[2]}
        elif kind == "archive":
            need(4, len(f) == 4 and f[1] in ("site", "bin") and f[2].isdigit() and HEX64.fullmatch(f[3]) is not None)
            m["archives"][f[0]] = {"dest": f[1], "bytes": int(f[2]), "sha256": f[3]}
        elif kind == "total":
            need(1, bool(f) and f[0].isdigit())
            m["total"] = int(f[0])
        else:
            raise ValueError(f"line {n}: unknown record {kind!r}")
    for key in ("format", "python", "total"):
        if key not in m:
            raise ValueError(f"no {key!r} record")
    if not m["archives"]:
        raise ValueError("no archive record")
    if sum(a["bytes"] for a in m["archives"].values()) != m["total"]:
        raise ValueError("total is not the sum of the archives' sizes")
    return m


# -- a fake bundle ------------------------------------------------------------------------------------------------
def _tar_xz(path: Path, files: dict[str, tuple[bytes, int]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            t.addfile(info, io.BytesIO(data))
    path.write_bytes(lzma.compress(buf.getvalue()))


def make_bundle(d: Path, python: str = PY) -> Path:
    d.mkdir(parents=True)
    _tar_xz(d / "site.tar.xz", {"dxfake_mod/__init__.py": (b"VALUE = 42\n", 0o644)})
    fake = b'#!/bin/sh\necho "fake-server version 9.9"\n'
    _tar_xz(d / "servers.tar.xz", {"etcd": (fake, 0o755), "nats-server": (fake, 0o755)})
    lines = ["# fake bundle", "format 1", f"python {python}", "platform manylinux_2_28_x86_64"]
    total = 0
    for name, dest in (("site.tar.xz", "site"), ("servers.tar.xz", "bin")):
        data = (d / name).read_bytes()
        total += len(data)
        lines.append(f"archive {name} {dest} {len(data)} {hashlib.sha256(data).hexdigest()}")
    lines.append(f"total {total}")
    (d / "manifest.txt").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """A PATH folder with only the tools gpu_run.sh needs: no etcd, no nats-server, no python."""
    b = tmp_path / "tools"
    b.mkdir()
    for t in TOOLS:
        where = shutil.which(t)
        assert where, f"{t} not found"
        (b / t).symlink_to(where)
    return b


def run(tools: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(tools), "TMPDIR": str(tmp), "HOME": str(tmp), "DX_PYTHON": f"{sys.executable} -S"}
    return subprocess.run(["bash", str(GPU_RUN), *args], env=env, capture_output=True, text=True, timeout=60,
                          cwd=tmp)  # fmt: skip


def fresh(d: Path) -> Path:
    d.mkdir()
    return d


def missing(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("MISSING: ")]


# -- tests ---------------------------------------------------------------------------------------------------------
def test_no_bundle_everything_missing_is_reported_and_the_command_still_runs(tools: Path, tmp_path: Path) -> None:
    r = run(tools, tmp_path, "--bundle", str(tmp_path / "nope"), "--", "true")
    assert r.returncode == 0, r.stdout + r.stderr  # the command's status
    m = missing(r.stdout)
    assert any("bundle folder" in line and "nope" in line for line in m), r.stdout
    for mod in ("dynamo.runtime", "dynamo.llm", "dynamo.frontend", "nixl._api", "pydantic", "msgspec", "nats",
                "etcd3aio", "torch", "triton"):  # fmt: skip
        assert any(line.startswith(f"MISSING: module {mod}:") for line in m), (mod, r.stdout)
    assert "MISSING: binary etcd" in r.stdout and "MISSING: binary nats-server" in r.stdout
    assert re.search(rf"== {len(m)} missing ==", r.stdout), r.stdout
    assert "ok       dynamo_ext " in r.stdout  # the tree itself is on PYTHONPATH

    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(tools, tmp_path, "--bundle", str(empty))  # no command: status says whether anything is missing
    assert r.returncode == 1
    assert any("manifest.txt" in line for line in missing(r.stdout)), r.stdout


def test_fake_bundle_unpacks_sets_the_environment_and_runs(tools: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    assert parse_manifest((bundle / "manifest.txt").read_text())["total"] > 0
    cmd = ("import dxfake_mod, os; e = os.environ; print('value', dxfake_mod.VALUE, e['UCX_NET_DEVICES'], "
           "e['NCCL_NVLS_ENABLE'], e['DYN_TCP_RPC_HOST'], e['HF_HUB_OFFLINE'], e['DYN_EVENT_PLANE'])")
    r = run(tools, tmp_path, "--bundle", str(bundle), "--", sys.executable, "-S", "-c", cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unpacked 2 archives" in r.stdout
    assert "value 42 lo 0 127.0.0.1 1 nats" in r.stdout
    site, bins = tmp_path / "dx-site", tmp_path / "dx-bin"
    assert (site / "dxfake_mod" / "__init__.py").is_file() and os.access(bins / "etcd", os.X_OK)
    assert re.search(r"^ok +etcd +9\.9 +" + re.escape(str(bins / "etcd")), r.stdout, re.M), r.stdout
    assert "MISSING: binary" not in r.stdout and "MISSING: archive" not in r.stdout
    assert "MISSING: module pydantic:" in r.stdout  # the fake bundle has none of the real modules

    r = run(tools, tmp_path, "--bundle", str(bundle), "--", sys.executable, "-S", "-c", cmd)
    assert "already unpacked" in r.stdout and "value 42" in r.stdout


def test_damaged_bundle_and_wrong_python_are_reported(tools: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with open(bundle / "site.tar.xz", "ab") as f:
        f.write(b"x")
    r = run(tools, fresh(tmp_path / "t1"), "--bundle", str(bundle), "--", "true")
    assert r.returncode == 0
    assert any(line.startswith("MISSING: archive site.tar.xz intact") for line in missing(r.stdout)), r.stdout
    assert not (tmp_path / "t1" / "dx-site" / ".dx-manifest").exists()  # a damaged unpack is never marked done

    other = make_bundle(tmp_path / "b2", python="3.99")
    r = run(tools, fresh(tmp_path / "t2"), "--bundle", str(other))
    assert any(line.startswith("MISSING: Python 3.99") for line in missing(r.stdout)), r.stdout
    assert r.returncode == 1


def test_manifest_parser_rejects_bad_records() -> None:
    good = "format 1\npython 3.12\narchive a.tar.xz site 3 " + "0" * 64 + "\ntotal 3\n"
    assert parse_manifest(good)["archives"]["a.tar.xz"]["bytes"] == 3
    for bad in (good.replace("site", "usr"), good.replace("total 3", "total 4"), good.replace("format 1", "format 2"),
                good + "bogus x\n", good.replace("python 3.12", "python three")):  # fmt: skip
        with pytest.raises(ValueError):
            parse_manifest(bad)


@pytest.mark.parametrize("folder", [".gpu_bundle", ".gpu_bundle-py311"])
def test_built_manifest_parses(folder: str) -> None:
    """When a real bundle was built here: its manifest parses, lists every archive present, and its wheels have
    the tags of its Python."""
    path = ROOT / folder / "manifest.txt"
    if not path.is_file():
        pytest.skip(f"{folder} not built (scripts/gpu_bundle.sh)")
    m = parse_manifest(path.read_text())
    assert set(m["archives"]) == {p.name for p in path.parent.glob("*.tar.xz")}
    assert {a["dest"] for a in m["archives"].values()} == {"site", "bin"}
    assert set(m["binaries"]) == {"etcd", "nats-server"}
    cp = "cp" + m["python"].replace(".", "")
    for name, w in m["wheels"].items():
        py, abi, _plat = w["tags"].split("-")
        assert (abi == "none" and "py3" in py) or abi == cp or abi == "abi3", (name, w)
        assert w["file"].split("-")[1] == w["version"], (name, w)
    for name in ("ai-dynamo-runtime", "ai-dynamo", "nixl", "nixl-cu13", "pydantic", "pydantic-core", "msgspec",
                 "nats-py", "etcd3aio"):  # fmt: skip
        assert name in m["wheels"], name
