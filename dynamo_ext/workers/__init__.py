"""dynamo_ext.workers — Dynamo 1.6 components (see README.md in this folder for the layer's contract).

    __main__.py        python -m dynamo_ext.workers --role {agg,prefill,decode,router} --config --model-dir
    runtime.py         WorkerProcess: DistributedRuntime, leased etcd record, /metrics + /health, ready line, SIGTERM
    engine_runner.py   EngineRunner: one engine thread, step loop, per-request queues, waits for free blocks
    engine_worker.py   EngineWorker: engine + BlockPool + KV events + FPM/KV-usage publishers + NIXL pool
    decode.py          DecodeWorker (roles decode, agg): generate; pulls a KvHandle with one NIXL READ
    prefill.py         PrefillWorker: prefill / generate -> KvHandle, release, deadline reaper
    router.py          RouterWorker: public model endpoint; round-robin or routing.decide; prefill -> decode
    protocol.py        KvHandle, request parsing (BadRequest), error chunks

Submodules import Dynamo lazily (inside setup()), so importing this package needs no Dynamo runtime.
"""
