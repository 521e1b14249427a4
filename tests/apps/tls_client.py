"""HTTPS client with Python requests (urllib3 → ssl → libssl.so): waits for a line on stdin (so
the agent can attach to this process first), then GETs each URL on one keep-alive session and
prints the status codes. Usage: tls_client.py CAFILE URL...
"""
import sys

import requests

sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.readline()
s = requests.Session()
for url in sys.argv[2:]:
    r = s.get(url, verify=sys.argv[1], timeout=10)
    sys.stdout.write("%d\n" % r.status_code)
sys.stdout.flush()
