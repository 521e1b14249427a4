"""PostgreSQL over TLS from psycopg 3 (psycopg-binary: libpq and a *bundled* libssl,
libssl-<hash>.so.3) with sslmode=require, and Redis over TLS from redis-py (Python's ssl module,
the system libssl). Connections are opened after the agent attached (the script waits for a line
on stdin first), so the traced TLS handshake and startup are seen.
Usage: tls_db_client.py PG_PORT [REDIS_TLS_PORT]"""
import sys

import psycopg

print("waiting", flush=True)
sys.stdin.readline()
with psycopg.connect(
    f"host=127.0.0.1 port={sys.argv[1]} dbname=shop user=postgres sslmode=require", autocommit=True
) as pg:
    assert pg.info.pgconn.ssl_in_use
    cur = pg.cursor()
    cur.execute("SELECT name FROM items WHERE name <> 'secret-tls-literal' ORDER BY id")
    assert [r[0] for r in cur.fetchall()] == ["widget", "gadget", "gizmo"]
    cur.execute("UPDATE items SET qty = %s WHERE id = 1", (42,))
    try:
        cur.execute("SELECT * FROM no_such_table")
    except psycopg.errors.UndefinedTable:
        pass
if len(sys.argv) > 2:
    import redis

    r = redis.Redis(host="127.0.0.1", port=int(sys.argv[2]), ssl=True, ssl_cert_reqs="none")
    r.set("tls:k", "secret-tls-value")
    assert r.get("tls:k") == b"secret-tls-value"
    r.close()
print("done", flush=True)
