#!/usr/bin/env python3
"""Seed fuzz/corpus/{postgres,redis,sql} from the golden fixtures (encoding described in
src/lib.rs). Optional: the targets also run from an empty corpus.

    python3 fuzz/seed_corpus.py
"""
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "agent", "protocols", "tests", "fixtures")


def encode(base):
    s = open(base + ".to_server.bin", "rb").read()
    c = open(base + ".to_client.bin", "rb").read()
    out = bytearray()
    for e in json.load(open(base + ".chunks.json")):
        d, off, ln = e[:3]
        data = (s if d == "s" else c)[off : off + ln]
        while data:
            n = min(len(data), 47)
            out.append((0x80 if d == "c" else 0) | n)
            out += data[:n]
            data = data[n:]
    return bytes(out)


for proto in ("postgres", "redis"):
    dst = os.path.join(HERE, "corpus", proto)
    os.makedirs(dst, exist_ok=True)
    for f in glob.glob(os.path.join(FIX, proto, "*.chunks.json")):
        base = f[: -len(".chunks.json")]
        with open(os.path.join(dst, os.path.basename(base)), "wb") as o:
            o.write(encode(base))
dst = os.path.join(HERE, "corpus", "sql")
os.makedirs(dst, exist_ok=True)
for i, q in enumerate(
    [
        "SELECT * FROM t WHERE a = 'x' AND b IN (1, 2, 3)",
        "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
        "SELECT E'a\\'b', $$q$$, $t$ z $t$, U&'\\0061', B'01' -- c\n/* d /* e */ */",
        "CREATE UNIQUE INDEX i ON ONLY t (a); COPY t FROM STDIN",
    ]
):
    open(os.path.join(dst, f"seed{i}"), "wb").write(q.encode())
