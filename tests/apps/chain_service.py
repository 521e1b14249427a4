"""Service A of the trace-context tests: a threaded HTTP/1.1 server (Python http.server) that,
for GET /checkout, calls service B over HTTP (http.client, a new connection per call or a
kept-alive one) and then answers. Usage: chain_service.py PORT DOWNSTREAM_PORT"""
import http.client
import http.server
import sys

DOWN = int(sys.argv[2])


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        status = 200
        if self.path.startswith("/checkout"):
            c = http.client.HTTPConnection("127.0.0.1", DOWN, timeout=10)
            c.request("GET", "/stock/42")
            r = c.getresponse()
            r.read()
            status = 200 if r.status == 200 else 502
            c.close()
        body = b"done\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
