#!/usr/bin/env python3
"""A small webhook listener that hands each POSTed body to a command's standard input.

Alertmanager and GitHub deliver webhooks over HTTP; the connectors beside this
file read one payload from standard input. This listener joins the two:

    AGENT_RELAY_INTEGRATION_TOKEN=... python3 webhook-stdin.py --port 9095 -- python3 alertmanager.py
    GITHUB_WEBHOOK_SECRET=... AGENT_RELAY_INTEGRATION_TOKEN=... \\
        python3 webhook-stdin.py --port 9096 --github-secret-env GITHUB_WEBHOOK_SECRET -- python3 github_issues.py

- Every POST (any path) runs the command once, with the body on standard
  input; payloads are handled one at a time, in the order they arrive.
- The answer is 200 with the command's output when it exits 0, else 502, so
  the sender shows the failure and retries where it does (Alertmanager does).
- With --github-secret-env NAME, the X-Hub-Signature-256 header must be the
  HMAC-SHA256 of the body keyed by that variable's value (the webhook's secret
  in GitHub), else 401. GitHub's `ping` event is answered without running the
  command. The X-GitHub-Event header is passed to the command as GITHUB_EVENT.
- It listens on 127.0.0.1 unless --host says otherwise; put it behind your
  usual TLS proxy to take webhooks from outside.

Standard library only, Python 3.8+. Prints `listening on http://HOST:PORT` once ready.
"""
import argparse
import hashlib
import hmac
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1024 * 1024


def make_handler(command, secret, timeout):
    run_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "webhook-stdin"
        sys_version = ""

        def log_message(self, format, *args):
            sys.stderr.write("webhook-stdin: %s %s\n" % (self.address_string(), format % args))

        def reply(self, status, text):
            data = (text.rstrip("\n") + "\n").encode("utf-8", "replace")
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply(200, "webhook-stdin: POST a webhook payload here")

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or "0")
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:
                self.close_connection = True
                return self.reply(413, "the body must have a Content-Length of at most %d bytes" % MAX_BODY)
            body = self.rfile.read(length)
            if secret is not None:
                want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(want, self.headers.get("X-Hub-Signature-256") or ""):
                    return self.reply(401, "X-Hub-Signature-256 does not match the webhook secret")
            event = self.headers.get("X-GitHub-Event")
            if event == "ping":
                return self.reply(200, "pong")
            env = dict(os.environ)
            env["WEBHOOK_PATH"] = self.path
            if event:
                env["GITHUB_EVENT"] = event
            with run_lock:
                try:
                    done = subprocess.run(command, input=body, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          env=env, timeout=timeout)
                except subprocess.TimeoutExpired:
                    return self.reply(502, "the command took longer than %d s" % timeout)
                except OSError as e:
                    return self.reply(502, "the command could not run: %s" % e)
            output = done.stdout.decode("utf-8", "replace")
            sys.stderr.write(output)
            self.reply(200 if done.returncode == 0 else 502, output or "exit status %d" % done.returncode)

    return Handler


def main(argv=None):
    parser = argparse.ArgumentParser(description="Hand each POSTed webhook body to a command's standard input.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9095, help="port (default 9095; 0 picks a free one)")
    parser.add_argument("--github-secret-env", metavar="NAME",
                        help="check X-Hub-Signature-256 against the secret in this environment variable")
    parser.add_argument("--timeout", type=int, default=60, help="seconds the command may take (default 60)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- python3 alertmanager.py")
    secret = None
    if args.github_secret_env:
        value = os.environ.get(args.github_secret_env)
        if not value:
            parser.error("%s is not set; it should hold the webhook's secret" % args.github_secret_env)
        secret = value.encode("utf-8")
    server = ThreadingHTTPServer((args.host, args.port), make_handler(command, secret, args.timeout))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print("listening on http://%s:%d" % (host, port), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
