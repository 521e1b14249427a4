"""Upstream of the topology test, instrumented with the real OpenTelemetry Python SDK: for each
request it starts a CLIENT span and sends its context as W3C `traceparent` (the SDK's default
propagator), then prints one JSON line {"n", "trace_id", "span_id", "status"}.
Usage: otel_client.py PORT FIRST COUNT CONCURRENCY"""
import http.client
import json
import sys
import threading

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("waybill-topology-test")
PORT, FIRST, COUNT, CONC = (int(a) for a in sys.argv[1:5])
lock = threading.Lock()


def worker(ns):
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    for n in ns:
        with tracer.start_as_current_span("GET /order", kind=trace.SpanKind.CLIENT) as span:
            headers = {}
            propagate.inject(headers)
            c.request("GET", f"/order/{n}", headers=headers)
            r = c.getresponse()
            r.read()
            ctx = span.get_span_context()
            with lock:
                print(json.dumps({"n": n, "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
                                  "status": r.status}), flush=True)
    c.close()


ns = list(range(FIRST, FIRST + COUNT))
threads = [threading.Thread(target=worker, args=(ns[i::CONC],)) for i in range(CONC)]
for t in threads:
    t.start()
for t in threads:
    t.join()
