#!/usr/bin/env python3
"""Seed fuzz/corpus/{http1,postgres,redis,sql} from the golden fixtures (encoding described in
src/lib.rs). Optional: the targets also run from an empty corpus. `cargo xtask fuzz` runs it.

    python3 fuzz/seed_corpus.py
"""
import glob
import json
import os
import struct

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


def pack(chunks):
    """(to_client, bytes) pairs → the fuzz input encoding (at most 47 bytes per piece)."""
    out = bytearray()
    for to_client, data in chunks:
        while data:
            n = min(len(data), 47)
            out.append((0x80 if to_client else 0) | n)
            out += data[:n]
            data = data[n:]
    return bytes(out)


def http1_records(path):
    """The http1 fixtures: records of 1 direction byte ('>' or '<'), 4-byte BE length, payload."""
    b = open(path, "rb").read()
    i, out = 0, []
    while i + 5 <= len(b):
        d = b[i : i + 1]
        (n,) = struct.unpack(">I", b[i + 1 : i + 5])
        out.append((d == b"<", b[i + 5 : i + 5 + n]))
        i += 5 + n
    return out


dst = os.path.join(HERE, "corpus", "http1")
os.makedirs(dst, exist_ok=True)
for f in sorted(glob.glob(os.path.join(FIX, "http1", "*.bin"))):
    # Keep seeds small: the start of each recorded connection is what matters.
    data = pack(http1_records(f))[:8192]
    with open(os.path.join(dst, os.path.basename(f)[: -len(".bin")]), "wb") as o:
        o.write(data)

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
