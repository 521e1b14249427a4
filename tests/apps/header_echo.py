"""Downstream service of the injection tests: an unmodified stdlib ThreadingHTTPServer (HTTP/1.1,
keep-alive) that records, per request, the request line, every header as received (in order,
repeated ones kept) and the body's length and sha256, as one JSON line in LOG_FILE; it answers
with the same JSON. Usage: header_echo.py HOST PORT LOG_FILE"""
import hashlib
import http.server
import json
import sys
import threading

HOST, PORT, LOG = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        rec = {
            "requestline": self.requestline,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        out = json.dumps(rec).encode()
        with lock, open(LOG, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = handle_any
    do_POST = handle_any
    do_PUT = handle_any

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
