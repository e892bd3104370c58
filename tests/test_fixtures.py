import urllib.request


def test_etcd_and_nats_answer(etcd_server, nats_server):
    with urllib.request.urlopen(f"{etcd_server.url}/health", timeout=2) as r:
        assert b"true" in r.read()
    import socket

    with socket.create_connection(("127.0.0.1", nats_server.port), timeout=2) as s:
        assert s.recv(4).startswith(b"INFO")
    etcd_server.restart()
    with urllib.request.urlopen(f"{etcd_server.url}/health", timeout=2) as r:
        assert b"true" in r.read()
