// HTTPS service on Node.js's `https` module (OpenSSL linked statically into `node`, memory BIO).
// Routes as http_server.py: GET /users/<id>, POST /orders, GET /missing (404), GET /fail (500),
// GET /slow (300 ms). Usage: node tls_node_server.js PORT CERT KEY
'use strict';
const https = require('https');
const fs = require('fs');

const [port, cert, key] = process.argv.slice(2);
const send = (res, code, body) => {
  res.writeHead(code, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
};
https
  .createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, (req, res) => {
    const path = req.url.split('?')[0];
    if (req.method === 'POST') {
      req.on('data', () => {});
      req.on('end', () => send(res, 201, 'created\n'));
    } else if (path === '/slow') {
      setTimeout(() => send(res, 200, 'slow\n'), 300);
    } else if (path === '/fail') {
      send(res, 500, 'boom\n');
    } else if (path.startsWith('/users/')) {
      send(res, 200, JSON.stringify({ user: path.slice(7) }) + '\n');
    } else {
      send(res, 404, 'not found\n');
    }
  })
  .listen(Number(port), '127.0.0.1');
