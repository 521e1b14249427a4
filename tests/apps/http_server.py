"""A small threaded HTTP/1.1 (keep-alive) service built on Python's standard http.server.

Routes: GET /users/<id>, POST /orders (reads its body), GET /missing (404), GET /slow (300 ms),
GET /fail (500), GET /chunked (chunked response). Usage: http_server.py PORT
"""
import http.server
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/slow":
            time.sleep(0.3)
            self._send(200, b"slow\n")
        elif path == "/fail":
            self._send(500, b"boom\n")
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"alpha\n", b"beta\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif path.startswith("/users/"):
            self._send(200, b'{"user": "%s"}\n' % path[7:].encode())
        else:
            self._send(404, b"not found\n")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        self.rfile.read(n)
        self._send(201, b"created\n")

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
