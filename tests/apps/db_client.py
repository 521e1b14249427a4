"""A database client for the Postgres/Redis tests: psycopg 3 (libpq, extended protocol with a
prepared statement) and redis-py. Both connections are opened BEFORE the agent attaches (like a
connection pool), then the script waits for a line on stdin and makes a known list of calls.
Usage: db_client.py PG_PORT REDIS_PORT"""
import sys

import psycopg
import redis

pg = psycopg.connect(f"host=127.0.0.1 port={sys.argv[1]} dbname=shop user=postgres", autocommit=True)
r = redis.Redis(host="127.0.0.1", port=int(sys.argv[2]))
r.ping()
print("ready", flush=True)
sys.stdin.readline()

cur = pg.cursor()
# 3 executions of one prepared statement (Parse once, then Bind/Execute), literals in the SQL.
for i in range(3):
    cur.execute("SELECT id, name FROM items WHERE id = %s AND name <> 'secret-literal'", (i,), prepare=True)
    cur.fetchall()
cur.execute("UPDATE items SET qty = qty + 1 WHERE name = 'widget'")
try:
    cur.execute("SELECT * FROM no_such_table")
except psycopg.errors.UndefinedTable:
    pass
# A connection opened after the agent attached: its StartupMessage names the database.
fresh = psycopg.connect(f"host=127.0.0.1 port={sys.argv[1]} dbname=shop user=postgres", autocommit=True)
fresh.execute("SELECT count(*) FROM items WHERE qty > 1").fetchall()
fresh.close()

p = r.pipeline(transaction=False)
p.set("order:1", "v1")
p.set("order:2", "hunter2-secret")
p.get("order:1")
p.execute()
r.lpush("cart:7", "x")
try:
    r.get("cart:7")
except redis.ResponseError:
    pass
try:
    r.execute_command("AUTH", "topsecretpw")
except redis.RedisError:  # AuthenticationError: no password is configured
    pass
print("done", flush=True)
sys.stdin.readline()
