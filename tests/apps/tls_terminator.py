"""A TLS terminator for the OTLP/gRPC-over-TLS test: accepts TLS (ALPN h2) on a port and relays
the plaintext bytes to an upstream port (the collector's plaintext gRPC listener).

usage: tls_terminator.py LISTEN_PORT CERT KEY UPSTREAM_PORT  (prints "ready" once listening)
"""
import asyncio
import ssl
import sys

port, cert, key, upstream = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["h2"])


async def relay(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()


async def handle(r, w):
    ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
    await asyncio.gather(relay(r, uw), relay(ur, w), return_exceptions=True)


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
