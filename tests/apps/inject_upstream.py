"""Upstream service of the injection tests: a threaded stdlib HTTP/1.1 server that, for
GET /call, calls DOWN_HOST:DOWN_PORT over one kept-alive http.client connection:
  GET /down/get                                   (no traceparent: Waybill should inject one)
  POST /down/post with a body that looks like an HTTP request (must arrive byte-identical)
  GET /down/own with its own traceparent          (must not get a second one)
then answers 200. Unmodified stdlib code; no tracing library.
Usage: inject_upstream.py HOST PORT DOWN_HOST DOWN_PORT"""
import http.client
import http.server
import sys

HOST, PORT, DHOST, DPORT = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
BODY = b"GET /not-a-request HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4
OWN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        c = http.client.HTTPConnection(DHOST, DPORT, timeout=10)
        ok = True
        for method, path, body, headers in (
            ("GET", "/down/get", None, {}),
            ("POST", "/down/post", BODY, {"Content-Type": "application/octet-stream"}),
            ("GET", "/down/own", None, {"traceparent": OWN}),
        ):
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            r.read()
            ok = ok and r.status == 200
        c.close()
        out = b"ok\n" if ok else b"downstream failed\n"
        self.send_response(200 if ok else 502)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
