"""Stands in for ``python`` in serve tests: emulates ``-m dynamo_ext.workers`` and ``-m dynamo.frontend``.

Worker: grants an etcd lease (JSON gateway at $ETCD_ENDPOINTS), puts a record under
``dynamo_ext/v1/workers/<ns>/<role>/<lease>``, prints ``DYNAMO_EXT_READY``; on SIGTERM revokes the
lease and exits 0. ``STUB_NO_REVOKE=<role>``: exit without revoking (a stale record);
``STUB_CRASH=<role>``: exit 5 shortly after being ready. Frontend: /v1/models lists $STUB_MODEL,
/v1/completions answers " stub answer".
"""

import base64
import json
import os
import signal
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def arg(name, default=None):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def gw(path, body):
    url = os.environ["ETCD_ENDPOINTS"].split(",")[0]
    req = urllib.request.Request(url + path, data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def worker():
    role = arg("--role")
    lease = int(gw("/v3/lease/grant", {"TTL": 60})["ID"])
    key = f"dynamo_ext/v1/workers/{os.environ.get('STUB_NS', 'dynamo')}/{role}/{lease}"
    gw("/v3/kv/put", {"key": base64.b64encode(key.encode()).decode(), "value": "eA==", "lease": str(lease)})

    def bye(*_):
        if os.environ.get("STUB_NO_REVOKE") != role:
            gw("/v3/lease/revoke", {"ID": str(lease)})
        sys.exit(0)

    signal.signal(signal.SIGTERM, bye)
    print(f"worker {role} index={arg('--index')} model-dir={arg('--model-dir')}", flush=True)
    print(f"DYNAMO_EXT_READY role={role} instance_id={lease} metrics=http://127.0.0.1:{arg('--metrics-port')}/metrics",
          flush=True)
    if os.environ.get("STUB_CRASH") == role:
        time.sleep(0.5)
        print("stub crash", flush=True)
        sys.exit(5)
    while True:
        time.sleep(0.1)


class Frontend(BaseHTTPRequestHandler):
    def _json(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json({"object": "list", "data": [{"id": os.environ["STUB_MODEL"], "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._json({"choices": [{"text": " stub answer", "finish_reason": "length"}],
                    "usage": {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": 2}})

    def log_message(self, *a):
        pass


def frontend():
    print("frontend argv:", " ".join(sys.argv[1:]), flush=True)
    srv = ThreadingHTTPServer((arg("--http-host"), int(arg("--http-port"))), Frontend)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv.serve_forever()


if __name__ == "__main__":
    mod = arg("-m")
    {"dynamo_ext.workers": worker, "dynamo.frontend": frontend}[mod]()
