//! RAII guards for the root integration tests: the agent, real servers (Python http.server,
//! nginx), free ports. Every guard stops its process on drop, so a failing test leaves nothing
//! running.

use std::{
    io::{BufRead, BufReader, Read},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The waybill binary under test (`WAYBILL_BIN`, else target/release/waybill).
pub fn waybill_bin() -> PathBuf {
    std::env::var_os("WAYBILL_BIN").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/release/waybill"))
}

/// True when the tests can load eBPF programs. Outside CI a non-root run skips them loudly;
/// in CI (CI=true) a non-root run fails.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "root integration tests must run as root in CI");
    eprintln!("SKIPPED: this test loads eBPF programs and needs root (run `sudo cargo xtask test`)");
    false
}

unsafe extern "C" {
    fn geteuid() -> u32;
    fn kill(pid: i32, sig: i32) -> i32;
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub fn wait_port(port: u16, timeout: Duration) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so that servers with workers (nginx) stop them too.
        // SAFETY: plain kill(2) on our own child.
        unsafe { kill(self.child.id() as i32, 15) };
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python `http.server` service in tests/apps/http_server.py on a free port.
pub struct PythonHttp {
    pub proc: Proc,
    pub port: u16,
}

impl PythonHttp {
    pub fn start(env: &[(&str, &str)]) -> Self {
        Self::start_on(free_port(), env)
    }

    pub fn start_on(port: u16, env: &[(&str, &str)]) -> Self {
        let child = Command::new("python3")
            .arg(repo_root().join("tests/apps/http_server.py"))
            .arg(port.to_string())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 must be installed (cargo xtask setup)");
        let me = Self { proc: Proc { child, name: "python http.server".into() }, port };
        wait_port(port, Duration::from_secs(10));
        me
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// nginx (Debian's) with one worker, serving a temp directory on a free port.
pub struct Nginx {
    pub proc: Proc,
    pub port: u16,
    _dir: TempDir,
}

impl Nginx {
    pub fn start() -> Self {
        let dir = TempDir::new("nginx");
        let port = free_port();
        let root = dir.path().join("www");
        std::fs::create_dir_all(root.join("api")).unwrap();
        std::fs::write(root.join("index.html"), "<h1>hello from nginx</h1>\n").unwrap();
        std::fs::write(root.join("api/items.json"), "[1,2,3]\n").unwrap();
        std::fs::write(root.join("big.bin"), vec![b'x'; 200_000]).unwrap();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 server {{\n    listen 127.0.0.1:{port};\n    root {root};\n    keepalive_requests 1000;\n\
                 location = /teapot {{ return 418 'short and stout'; }}\n  }}\n}}\n",
                d = dir.path().display(),
                root = root.display(),
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/nginx")
            .args(["-c", conf.to_str().unwrap(), "-p", dir.path().to_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx must be installed (cargo xtask setup installs nginx-light)");
        let me = Self { proc: Proc { child, name: "nginx".into() }, port, _dir: dir };
        wait_port(port, Duration::from_secs(10));
        me
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("waybill-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// pgjdbc from Debian's `libpostgresql-jdbc-java` (`cargo xtask setup` installs it).
pub const PG_JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Compiles `tests/apps/java/NAME.java` with `javac` (Debian's `openjdk-17-jdk-headless`) against
/// `classpath` into a temp dir; the guard's path is the class directory.
pub fn javac(name: &str, classpath: &[&str]) -> TempDir {
    let dir = TempDir::new(&format!("java-{name}"));
    let src = repo_root().join(format!("tests/apps/java/{name}.java"));
    let out = Command::new("javac")
        .arg("-d")
        .arg(dir.path())
        .args(["-cp", &classpath.join(":")])
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("javac (cargo xtask setup installs openjdk-17-jdk-headless): {e}"));
    assert!(out.status.success(), "javac {}: {}", src.display(), String::from_utf8_lossy(&out.stderr));
    dir
}

/// What the agent printed.
#[derive(Debug)]
pub struct AgentOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A running `waybill run …`, stopped with SIGINT on `stop()` or drop.
pub struct Agent {
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn pump(r: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
}

impl Agent {
    /// Starts `waybill run ARGS` with `env` and waits until it says it is ready.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut cmd = Command::new(waybill_bin());
        cmd.arg("run").args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).env("WAYBILL_LOG", "info");
        for k in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", waybill_bin().display()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        pump(child.stdout.take().unwrap(), stdout.clone());
        pump(child.stderr.take().unwrap(), stderr.clone());
        let mut agent = Agent { child: Some(child), stdout, stderr };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if agent.stderr.lock().unwrap().contains(" ready") {
                return agent;
            }
            if let Ok(Some(st)) = agent.child.as_mut().unwrap().try_wait() {
                thread::sleep(Duration::from_millis(100));
                panic!("waybill exited before it was ready ({st}):\n{}", agent.stderr.lock().unwrap());
            }
            if Instant::now() > end {
                panic!("waybill not ready after 30 s:\n{}", agent.stderr.lock().unwrap());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Stops the agent (SIGSTOP) until [`Agent::resume`]: the kernel side keeps running and
    /// counting while user space drains nothing.
    pub fn pause(&self) {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { kill(self.pid() as i32, 19) }, 0);
    }

    /// SIGCONT after [`Agent::pause`].
    pub fn resume(&self) {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { kill(self.pid() as i32, 18) }, 0);
    }

    /// What it printed to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGINT, wait for exit (it flushes), return everything it printed.
    pub fn stop(mut self) -> AgentOutput {
        let mut child = self.child.take().unwrap();
        // SAFETY: plain kill(2) on our own child.
        unsafe { kill(child.id() as i32, 2) };
        let end = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > end {
                let _ = child.kill();
                break child.wait().unwrap();
            }
            thread::sleep(Duration::from_millis(50));
        };
        thread::sleep(Duration::from_millis(200));
        AgentOutput { status, stdout: self.stdout.lock().unwrap().clone(), stderr: self.stderr.lock().unwrap().clone() }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `waybill ARGS` to completion (for `check` and error cases).
pub fn waybill(args: &[&str], env: &[(&str, &str)]) -> AgentOutput {
    let out = Command::new(waybill_bin()).args(args).envs(env.iter().copied()).output().expect("run waybill");
    AgentOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a command and returns its stdout, panicking with its stderr on failure.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tiny HTTP GET (for /metrics and /healthz) returning (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = TcpStream::connect(addr).unwrap();
    // One write: the request head arrives whole.
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// A value from Prometheus text: the line `name value` (`name` with its labels, exactly).
pub fn metric_value(body: &str, name: &str) -> u64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{body}"))
}

/// A throwaway PostgreSQL cluster (Debian's PostgreSQL 15) on a free port, in a temp dir, owned
/// by the `postgres` user; never the system's default cluster. Database `shop` with a table.
pub struct Postgres {
    pub port: u16,
    dir: TempDir,
    bin: PathBuf,
}

/// A self-signed certificate for 127.0.0.1 / localhost, made with openssl: (dir guard, cert, key).
pub fn self_signed_cert() -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new("cert");
    let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            k.to_str().unwrap(),
            "-out",
            c.to_str().unwrap(),
        ],
    );
    (dir, c, k)
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `ssl = on` and a self-signed certificate (clients may still choose plaintext).
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let bin = ["/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("initdb").exists())
            .expect("PostgreSQL server binaries (cargo xtask setup installs postgresql)");
        let dir = TempDir::new("pg");
        let port = free_port();
        let data = dir.path().join("data");
        sh("chown", &["postgres:postgres", dir.path().to_str().unwrap()]);
        let as_pg = |args: &[&str]| {
            let out = Command::new("runuser").arg("-u").arg("postgres").arg("--").args(args).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        as_pg(&[bin.join("initdb").to_str().unwrap(), "-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres"]);
        let mut opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", dir.path().display());
        if tls {
            let (_cdir, cert, key) = self_signed_cert();
            // PostgreSQL wants the key owned by its user, mode 0600.
            let (c, k) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::copy(&cert, &c).unwrap();
            std::fs::copy(&key, &k).unwrap();
            sh("chown", &["postgres:postgres", c.to_str().unwrap(), k.to_str().unwrap()]);
            sh("chmod", &["600", k.to_str().unwrap()]);
            opts.push_str(&format!(" -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}", c.display(), k.display()));
        }
        as_pg(&[
            bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            dir.path().join("log").to_str().unwrap(),
            "-w",
            "start",
        ]);
        let me = Self { port, dir, bin };
        me.psql("postgres", "CREATE DATABASE shop");
        me.psql(
            "shop",
            "CREATE TABLE items (id int PRIMARY KEY, name text, qty int); \
             INSERT INTO items VALUES (0, 'widget', 1), (1, 'gadget', 2), (2, 'gizmo', 3)",
        );
        me
    }

    pub fn psql(&self, db: &str, sql: &str) -> String {
        sh("psql", &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", db, "-Atc", sql])
    }

    /// PID of the postmaster.
    pub fn pid(&self) -> u32 {
        let s = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).unwrap();
        s.lines().next().unwrap().trim().parse().unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// redis-server (Debian's) on a free port, no persistence.
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (cargo xtask setup installs it)");
        let me = Self { proc: Proc { child, name: "redis-server".into() }, port };
        wait_port(port, Duration::from_secs(10));
        me
    }

    /// TLS only (`--port 0 --tls-port`), with the certificate in `cert`/`key`, no client
    /// certificates. `None` when this redis-server was built without TLS.
    pub fn start_tls(cert: &Path, key: &Path) -> Option<Self> {
        if !redis_has_tls() {
            return None;
        }
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(cert)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (cargo xtask setup installs it)");
        let me = Self { proc: Proc { child, name: "redis-server (TLS)".into() }, port };
        wait_port(port, Duration::from_secs(10));
        Some(me)
    }
}

/// Whether Debian's redis-server was built with TLS (it links libssl then).
pub fn redis_has_tls() -> bool {
    Command::new("ldd")
        .arg(std::fs::canonicalize("/usr/bin/redis-server").unwrap_or_else(|_| "/usr/bin/redis-server".into()))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("libssl"))
        .unwrap_or(false)
}

/// Two network namespaces joined by a veth pair, created for one test and deleted on drop (even
/// when the test panics). Addresses are private (`10.213.<n>.1` in `a`, `10.213.<n>.2` in `b`) and
/// exist only inside these namespaces, so test traffic never leaves them.
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    pub addr_a: String,
    pub addr_b: String,
}

impl NetnsPair {
    pub fn new() -> Self {
        let id = std::process::id() % 100_000;
        let n = (std::process::id() % 250) + 1;
        let me = Self {
            a: format!("wb{id}a"),
            b: format!("wb{id}b"),
            addr_a: format!("10.213.{n}.1"),
            addr_b: format!("10.213.{n}.2"),
        };
        // Left-overs of a killed earlier run with the same pid.
        me.delete();
        let (va, vb) = (format!("wbv{id}a"), format!("wbv{id}b"));
        sh("ip", &["netns", "add", &me.a]);
        sh("ip", &["netns", "add", &me.b]);
        sh("ip", &["link", "add", &va, "netns", &me.a, "type", "veth", "peer", "name", &vb, "netns", &me.b]);
        for (ns, dev, addr) in [(&me.a, &va, &me.addr_a), (&me.b, &vb, &me.addr_b)] {
            sh("ip", &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            sh("ip", &["-n", ns, "link", "set", dev, "up"]);
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        me
    }

    fn delete(&self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }

    /// `ip netns exec NS CMD ARGS…` (exec, not fork: the child's pid is the command's pid).
    pub fn spawn(&self, ns: &str, cmd: &str, args: &[&str], name: &str) -> Proc {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, cmd])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("ip netns exec {ns} {cmd}: {e}"));
        Proc { child, name: name.into() }
    }

    /// Runs a command inside `ns` to completion and returns its stdout.
    pub fn run(&self, ns: &str, cmd: &str, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", ns, cmd];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Waits until something accepts connections on `addr:port` as seen from `ns`.
    pub fn wait_port(&self, ns: &str, addr: &str, port: u16, timeout: Duration) {
        let end = Instant::now() + timeout;
        let probe = format!("exec 3<>/dev/tcp/{addr}/{port}");
        while Instant::now() < end {
            let ok = Command::new("ip")
                .args(["netns", "exec", ns, "bash", "-c", &probe])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("nothing listens on {addr}:{port} in netns {ns} after {timeout:?}");
    }
}

impl Default for NetnsPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair and with it the peer.
        self.delete();
    }
}
