"""dynamo_ext.workers — Dynamo 1.6 components (see README.md in this folder for the layer's contract).

    __main__.py        python -m dynamo_ext.workers --role {agg,prefill,decode,router} --config --model-dir
    runtime.py         WorkerProcess: DistributedRuntime, leased etcd record, /metrics + /health, ready line, SIGTERM
    engine_worker.py   EngineWorker: serving.ServingWorker + KV events + FPM/KV-usage publishers + record;
                       DynamoWorkerPlane (records in etcd, the prefill release endpoint)
    decode.py          DecodeWorker (roles decode, agg): generate / export / drain hand-over endpoints
    prefill.py         PrefillWorker: prefill / generate -> KvHandle, release
    router.py          RouterWorker: public model endpoint over serving.RouterCore; DynamoRouterPlane

Only Dynamo adapters live here: what a worker and a router do is ``dynamo_ext.serving``'s.
Submodules import Dynamo lazily (inside setup()), so importing this package needs no Dynamo runtime.
"""
