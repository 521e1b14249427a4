# Runs INSIDE the `cargo xtask vm-test` guest, as root, in the host's / (read-only, tmpfs overlay).
# xtask prepends: REPO, BIN (the release waybill), SCRATCH (a read-write share), PORT.
# It only runs things and records their output in $SCRATCH; xtask (on the host) asserts.
set -u
cd "$REPO" || exit 2
echo "guest: $(uname -r) $(uname -m)"

# 1. waybill check
t0=$(cut -d' ' -f1 /proc/uptime)
"$BIN" check > "$SCRATCH/check.out" 2> "$SCRATCH/check.err"
echo $? > "$SCRATCH/check.rc"
echo "check took $(awk -v a="$t0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{print b-a}')s (guest time)"
cat "$SCRATCH/check.out" "$SCRATCH/check.err"

# 2. end to end: a Python http.server app, the agent on its PID in terminal mode, a few requests
python3 tests/apps/http_server.py "$PORT" > "$SCRATCH/app.log" 2>&1 &
APP=$!
echo "$APP" > "$SCRATCH/app.pid"
python3 -c '
import socket, sys, time
end = time.time() + 60
while time.time() < end:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close(); sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit("app never listened")' "$PORT" || { echo "the app did not start"; cat "$SCRATCH/app.log"; exit 3; }

t0=$(cut -d' ' -f1 /proc/uptime)
WAYBILL_LOG=info "$BIN" run --pid "$APP" > "$SCRATCH/agent.out" 2> "$SCRATCH/agent.err" &
AGENT=$!
i=0
until grep -q ' ready' "$SCRATCH/agent.err"; do
    kill -0 "$AGENT" 2>/dev/null || { echo "the agent exited before it was ready"; break; }
    i=$((i + 1)); [ "$i" -gt 1800 ] && { echo "the agent was not ready after 180 s"; break; }
    sleep 0.1
done
echo "agent start took $(awk -v a="$t0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{print b-a}')s (guest time)"

# One connection per request, in order; the statuses go to client.out.
python3 -c '
import http.client, sys
for method, path, body in [("GET", "/users/42", None), ("GET", "/users/7", None),
                           ("POST", "/orders", b"{\"item\": 1}"), ("GET", "/missing", None)]:
    c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
    c.request(method, path, body=body)
    r = c.getresponse(); r.read()
    print(method, path, r.status, flush=True)
    c.close()' "$PORT" > "$SCRATCH/client.out" 2>&1
echo "client: $(tr '\n' ';' < "$SCRATCH/client.out")"
sleep 2

kill -INT "$AGENT" 2>/dev/null
( sleep 30; kill -9 "$AGENT" 2>/dev/null ) &
WATCHDOG=$!
wait "$AGENT"
echo $? > "$SCRATCH/agent.rc"
kill "$WATCHDOG" 2>/dev/null
kill "$APP" 2>/dev/null
echo "--- agent stdout"; cat "$SCRATCH/agent.out"
echo "--- agent stderr (tail)"; tail -n 15 "$SCRATCH/agent.err"
sync
