"""Record a real signal series from `dynamo-ext serve` (CPU, tiny model) under a step load.

    .venv/bin/python tests/planner/data/record_series.py OUT.csv [--idle 20 --load 60 --tail 40 --clients 6]

Starts `dynamo-ext serve graphs/disagg.py` on a private config (own etcd/NATS ports, own namespace),
scrapes the frontend's and every worker's /metrics every `--tick` seconds with planner.metrics_source,
and drives a step load (idle -> N concurrent clients -> idle). One CSV row per tick:
t, phase, ttft_s, itl_s, transfer_share, requests, kv_usage, queue (empty = not measured).
Not a test: its output, tests/planner/data/*.csv, is replayed by test_recorded_series.py.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from dynamo_ext.launch.client import complete, list_models  # noqa: E402
from dynamo_ext.launch.infra import free_port  # noqa: E402
from planner.metrics_source import MetricNames, merge, parse, window  # noqa: E402



def worker_metric_ports(tag: str) -> list[int]:
    ports = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmd]
        if "dynamo_ext.workers" in args and any(tag in a for a in args) and "--metrics-port" in args:
            ports.append(int(args[args.index("--metrics-port") + 1]))
    return ports


def fetch(url: str) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--idle", type=float, default=20)
    ap.add_argument("--load", type=float, default=60)
    ap.add_argument("--tail", type=float, default=40)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--tick", type=float, default=2.0)
    ap.add_argument("--max-tokens", type=int, default=24)
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dx-record-"))
    cfg = yaml.safe_load((ROOT / "configs/disagg.yaml").read_text())
    # what the committed series were recorded with (configs/disagg.yaml now serves SmolLM2 and sends every
    # prompt through the prefill worker)
    cfg["model"] = {"name": "dynamo-ext/tiny", "preset": "tiny", "block_size": 16, "dtype": "float32"}
    cfg["router"] = {"policy": "dynamo-ext", "disagg_min_prompt_tokens": 64}
    etcd, nats, http = free_port(), free_port(), free_port()
    cfg["discovery"] = {"namespace": "dxrecord", "etcd": {"endpoints": [f"http://127.0.0.1:{etcd}"]},
                        "nats": {"url": f"nats://127.0.0.1:{nats}"}}
    cfg["frontend"] = {"http_host": "127.0.0.1", "http_port": http}
    cfg_path = work / "record.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    serve = subprocess.Popen([sys.executable, "-m", "dynamo_ext.cli", "serve", str(ROOT / "graphs/disagg.py"), "-f",
                              str(cfg_path), "--log-dir", str(work / "logs")], cwd=ROOT,
                             stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}"
    model = cfg["model"]["name"]
    names = MetricNames()
    rows = []
    try:
        deadline = time.monotonic() + 300
        while model not in list_models(base):
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve did not come up: " + (work / "serve.log").read_text()[-3000:])
            time.sleep(1)
        urls = [f"{base}/metrics"] + [f"http://127.0.0.1:{p}/metrics" for p in worker_metric_ports(str(cfg_path))]
        print("scraping", urls, flush=True)
        stop_load = threading.Event()
        load_on = threading.Event()
        errors = [0]

        def client(i: int) -> None:
            n = 0
            while not stop_load.is_set():
                if not load_on.is_set():
                    time.sleep(0.05)
                    continue
                try:
                    complete(base, model, f"client {i} request {n}: " + "tell me a story " * 8, a.max_tokens, timeout=60)
                except Exception:  # noqa: BLE001
                    errors[0] += 1
                n += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
        for t in threads:
            t.start()
        prev = None
        t0 = time.monotonic()
        total = a.idle + a.load + a.tail
        while (el := time.monotonic() - t0) < total:
            phase = "idle" if el < a.idle else "load" if el < a.idle + a.load else "tail"
            (load_on.set if phase == "load" else load_on.clear)()
            snaps = [parse(txt, names) for txt in map(fetch, urls) if txt]
            cur = merge(snaps)
            w = window(prev, cur, names)
            prev = cur
            rows.append({"t": round(el, 2), "phase": phase, "ttft_s": w.ttft_s, "itl_s": w.itl_s,
                         "transfer_share": w.transfer_share, "requests": w.requests, "kv_usage": w.kv_usage,
                         "queue": w.queue})
            print(rows[-1], flush=True)
            time.sleep(max(0.0, a.tick - (time.monotonic() - t0 - el)))
        stop_load.set()
        print("client errors:", errors[0])
    finally:
        serve.terminate()
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
    with open(a.out, "w", newline="") as f:
        f.write(f"# recorded {time.strftime('%Y-%m-%d %H:%M')} UTC by tests/planner/data/record_series.py: dynamo-ext serve "
                f"graphs/disagg.py (1 prefill + 2 decode, tiny model, CPU, 2 shared cores); {a.clients} clients "
                f"during 'load', max_tokens {a.max_tokens}, tick {a.tick} s\n")
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        for r in rows:
            wr.writerow({k: ("" if v is None else (round(v, 6) if isinstance(v, float) else v)) for k, v in r.items()})


if __name__ == "__main__":
    main()
