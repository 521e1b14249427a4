"""HTTPS client with Python requests (urllib3 → ssl → libssl.so, socket BIO).

Steps driven by stdin so that a test can attach the agent between them: prints "waiting", reads
a line, imports requests (this dlopens _ssl and libssl), prints "imported", reads a line, then GETs
each URL on one keep-alive session and prints each status code.
Usage: tls_client.py CAFILE URL...
"""
import sys

sys.stdout.write("waiting\n")
sys.stdout.flush()
sys.stdin.readline()
import requests  # noqa: E402

sys.stdout.write("imported\n")
sys.stdout.flush()
sys.stdin.readline()
s = requests.Session()
for url in sys.argv[2:]:
    r = s.get(url, verify=sys.argv[1], timeout=10)
    sys.stdout.write("%d\n" % r.status_code)
    sys.stdout.flush()
