// Service B of the trace-context tests: Node.js `http` (event loop). GET /stock/:id → JSON.
// Usage: node stock_service.js PORT
const http = require("http");
const port = Number(process.argv[2]);
http
  .createServer((req, res) => {
    setTimeout(() => {
      const body = JSON.stringify({ item: req.url.split("/").pop(), count: 3 });
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
      res.end(body);
    }, 5);
  })
  .listen(port, "127.0.0.1");
