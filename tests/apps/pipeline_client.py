"""Sends several HTTP/1.1 requests in ONE write on one connection (pipelining), then reads until
all responses arrived. Usage: pipeline_client.py PORT PATH [PATH ...]; prints the status codes."""
import socket
import sys

port, paths = int(sys.argv[1]), sys.argv[2:]
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: pipelined.test\r\n\r\n" % p.encode() for p in paths))
data = b""
s.settimeout(5)
while data.count(b"HTTP/1.1 ") < len(paths):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(" ".join(part[:3].decode() for part in data.split(b"HTTP/1.1 ")[1:]))
s.close()
