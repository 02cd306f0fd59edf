"""The baseline: the ceiling of the relay's HTTP stack, measured in the same run.

A bare ThreadingHTTPServer with the relay's server settings (HTTP/1.1
keep-alive, a thread per connection, Nagle off, the same socket timeout and
listen backlog) that reads the request body, parses it as JSON (as the relay
must) and answers a fixed JSON reply of about the size of the relay's answer
to a send, in one write. No routing, validation, storage or events: what is
left is what every request on this stack costs at least.

    python3 benchmarks/baseline_server.py [--port 0]

prints `baseline listening on http://127.0.0.1:<port>` and serves until SIGTERM.
"""
import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY = json.dumps(
    {
        "message": {
            "id": 123456, "from": "bench-sender", "to": "bench-sink", "subject": None, "body": "x" * 64, "kind": "chat",
            "channel": None, "claimable": False, "claimedBy": None, "claimedAt": None, "replyTo": None, "threadId": 123456,
            "idempotencyKey": None, "payload": {}, "meta": {}, "createdAt": 1700000000000,
        },
        "matched": ["bench-sink"],
        "online": 1,
    },
    separators=(",", ":"),
).encode("utf-8")
RESPONSE = (
    "HTTP/1.1 201 Created\r\nServer: baseline\r\nContent-Length: %d\r\nContent-Type: application/json; charset=utf-8\r\n"
    "Cache-Control: no-store\r\n\r\n" % len(REPLY)
).encode("latin-1") + REPLY


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 30

    def log_message(self, format, *args):
        pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n).decode("utf-8"))
        if not isinstance(body, dict):
            self.close_connection = True
        self.wfile.write(RESPONSE)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    server = Server(("127.0.0.1", args.port), Handler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    th = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True)
    th.start()
    print("baseline listening on http://127.0.0.1:%d" % server.server_address[1], flush=True)
    while not stop.wait(1.0):
        pass
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
