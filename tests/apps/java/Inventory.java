// Second service of the topology test: a thread-per-request JDK service. The JDK's own
// com.sun.net.httpserver.HttpServer on a fixed thread pool; PostgreSQL through JDBC (pgjdbc,
// extended protocol). The connection pool is opened at start-up, before the agent attaches (as
// a real pool would be): those connections are adopted mid-stream.
// GET /inventory/<n> → prepared SELECT (a bound parameter and a literal) → JSON.
// Usage: java -cp CLASSES:/usr/share/java/postgresql.jar Inventory PORT PG_PORT
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.Executors;

public class Inventory {
    static final int THREADS = 16;
    static final int POOL = 8;

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        int pgPort = Integer.parseInt(args[1]);
        String url = "jdbc:postgresql://127.0.0.1:" + pgPort + "/shop?user=postgres";
        BlockingQueue<Connection> pool = new ArrayBlockingQueue<>(POOL);
        for (int i = 0; i < POOL; i++) {
            pool.add(DriverManager.getConnection(url));
        }
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 128);
        server.createContext("/inventory/", ex -> handle(ex, pool));
        server.setExecutor(Executors.newFixedThreadPool(THREADS));
        server.start();
    }

    static void handle(HttpExchange ex, BlockingQueue<Connection> pool) {
        int status = 200;
        String body;
        try {
            String path = ex.getRequestURI().getPath();
            int n = Integer.parseInt(path.substring(path.lastIndexOf('/') + 1));
            Connection c = pool.take();
            try {
                // The alias names the request, so the test can tell which request a query served;
                // the literal 0 must reach the collector redacted.
                String sql = "SELECT name AS req_" + n + " FROM items WHERE id = ? AND qty > 0";
                try (PreparedStatement st = c.prepareStatement(sql)) {
                    st.setInt(1, 1);
                    try (ResultSet rs = st.executeQuery()) {
                        rs.next();
                        body = "{\"n\":" + n + ",\"name\":\"" + rs.getString(1) + "\"}";
                    }
                }
            } finally {
                pool.put(c);
            }
        } catch (Exception e) {
            status = 500;
            body = String.valueOf(e);
        }
        try {
            byte[] out = body.getBytes(StandardCharsets.UTF_8);
            ex.getResponseHeaders().set("Content-Type", "application/json");
            ex.sendResponseHeaders(status, out.length);
            try (OutputStream os = ex.getResponseBody()) {
                os.write(out);
            }
        } catch (Exception e) {
            // The client went away.
        } finally {
            ex.close();
        }
    }
}
