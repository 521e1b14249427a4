// Second service of the topology test: Node.js `http` (event loop) + `pg` (real PostgreSQL client).
// GET /inventory/<n> → SELECT from PostgreSQL → JSON. The pool connects lazily (first request).
// Usage: node inventory_service.js PORT PG_PORT
const http = require("http");
const { Pool } = require("pg");
const [port, pgPort] = [Number(process.argv[2]), Number(process.argv[3])];
const pool = new Pool({ host: "127.0.0.1", port: pgPort, user: "postgres", database: "shop", max: 4 });
http
  .createServer(async (req, res) => {
    const n = Number(req.url.split("/").pop()) || 0;
    try {
      // The alias names the request, so the test can tell which request a query served.
      const r = await pool.query(`SELECT name AS req_${n} FROM items WHERE id = 1`);
      const body = JSON.stringify({ n, name: r.rows[0][`req_${n}`] });
      res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
      res.end(body);
    } catch (e) {
      res.writeHead(500);
      res.end(String(e));
    }
  })
  .listen(port, "127.0.0.1");
