"""Middle service of the topology test: a threaded stdlib HTTP/1.1 server. GET /order/<n> calls
the inventory service over HTTP (http.client) and writes to Redis (redis-py), then answers.
The Redis connection pool connects lazily. Usage: order_service.py PORT INVENTORY_PORT REDIS_PORT"""
import http.client
import http.server
import sys

import redis

PORT, INV, RPORT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
R = redis.Redis(host="127.0.0.1", port=RPORT)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        n = self.path.rsplit("/", 1)[-1]
        c = http.client.HTTPConnection("127.0.0.1", INV, timeout=10)
        c.request("GET", f"/inventory/{n}")
        r = c.getresponse()
        data = r.read()
        c.close()
        R.set(f"order:{n}", data)
        ok = r.status == 200
        out = b"ok\n" if ok else b"inventory failed\n"
        self.send_response(200 if ok else 502)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
