//! Everything that runs on PostgreSQL: a throwaway cluster per test binary
//! (or the server named by `FACTLINE_TEST_PG_URL`) and a fresh database
//! per test.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The environment variable naming an existing server to test against.
pub const URL_VAR: &str = "FACTLINE_TEST_PG_URL";

const INSTALL_HINT: &str =
    "PostgreSQL server binaries (initdb, postgres, pg_isready) were not found \
     in /usr/lib/postgresql/*/bin or on PATH. Install them (Debian/Ubuntu: \
     `apt-get install -y postgresql`), or set FACTLINE_TEST_PG_URL to a \
     postgres:// URL of a server where the tests may create databases.";

/// How a throwaway cluster treats durability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync off: for tests that do not check what survives a crash.
    Throwaway,
    /// PostgreSQL's defaults: for crash and restart tests.
    Durable,
}

/// How to stop a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, write a checkpoint, exit.
    Fast,
    /// Exit at once without a checkpoint, like a crash: the next start
    /// runs recovery.
    Immediate,
}

/// A PostgreSQL cluster in a temporary directory, run as an unprivileged
/// user when the tests run as root (PostgreSQL refuses to run as root).
///
/// The server runs under a small shell that holds our end of a pipe: when
/// the test process exits, however it exits, the pipe closes and the shell
/// stops the server and removes its directory.
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    durability: Durability,
    run_as: Option<(u32, u32)>,
    running: Mutex<Option<(Child, ChildStdin)>>,
}

impl PgCluster {
    /// Creates and starts a cluster. Panics with an install hint when the
    /// PostgreSQL binaries are missing.
    pub fn start(durability: Durability) -> PgCluster {
        let bin = server_binaries(Path::new("/usr/lib/postgresql"), std::env::var_os("PATH"))
            .unwrap_or_else(|hint| panic!("{hint}"));
        let run_as = if running_as_root() {
            Some(unprivileged_user())
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("factline-pg-")
            .tempdir()
            .expect("creating a temporary directory for PostgreSQL")
            .keep();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .expect("handing the cluster directory to the PostgreSQL user");
        }
        let cluster = PgCluster {
            port: 0,
            bin,
            durability,
            run_as,
            running: Mutex::new(None),
            dir,
        };
        let out = cluster
            .command("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
                "-D",
            ])
            .arg(cluster.data_dir())
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Another process may take a port between our probe and the
        // server's bind; try a few.
        let mut cluster = cluster;
        for attempt in 0.. {
            cluster.port = free_port();
            match cluster.try_start() {
                Ok(()) => return cluster,
                Err(log) if attempt < 4 => eprintln!("PostgreSQL did not start, retrying: {log}"),
                Err(log) => panic!("PostgreSQL did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    /// The URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The port the cluster listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server and waits until it has exited.
    pub fn stop(&self, mode: StopMode) {
        let running = self.running.lock().unwrap().take();
        if let Some((mut child, mut stdin)) = running {
            let line = match mode {
                StopMode::Fast => "fast\n",
                StopMode::Immediate => "immediate\n",
            };
            let _ = stdin.write_all(line.as_bytes());
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again on the same port and data.
    pub fn restart(&self) {
        if let Err(log) = self.try_start() {
            panic!("PostgreSQL did not start again:\n{log}");
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn try_start(&self) -> Result<(), String> {
        let log_path = self.dir.join(format!("server-{}.log", self.port));
        let log = File::create(&log_path).map_err(|e| format!("creating the server log: {e}"))?;
        if let Some((uid, gid)) = self.run_as {
            let _ = std::os::unix::fs::chown(&log_path, Some(uid), Some(gid));
        }
        let mut settings = vec![
            "listen_addresses=127.0.0.1".to_string(),
            "max_connections=300".to_string(),
            "shared_buffers=64MB".to_string(),
        ];
        if self.durability == Durability::Throwaway {
            settings.extend(
                [
                    "fsync=off",
                    "synchronous_commit=off",
                    "full_page_writes=off",
                ]
                .map(String::from),
            );
        }
        // `read` returns at our "fast"/"immediate" line, or at end of file
        // when this process has gone; only then is the directory removed.
        let script = r#"
            "$0" "$@" &
            pid=$!
            if read -r mode; then
                if [ "$mode" = fast ]; then kill -INT "$pid"; else kill -QUIT "$pid"; fi
                wait "$pid"
            else
                kill -QUIT "$pid"
                wait "$pid"
                rm -rf "$FACTLINE_PG_DIR"
            fi
        "#;
        let mut shell = Command::new("sh");
        shell
            .arg("-c")
            .arg(script)
            .arg(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .env("FACTLINE_PG_DIR", &self.dir)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        for setting in &settings {
            shell.arg("-c").arg(setting);
        }
        if let Some((uid, gid)) = self.run_as {
            shell.uid(uid).gid(gid);
        }
        let mut child = shell
            .spawn()
            .map_err(|e| format!("starting PostgreSQL: {e}"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline || server_failed(&log_path) {
                let mut stdin = stdin;
                let _ = stdin.write_all(b"immediate\n");
                drop(stdin);
                let _ = child.wait();
                return Err(std::fs::read_to_string(&log_path).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        *self.running.lock().unwrap() = Some((child, stdin));
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop(StopMode::Immediate);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server that cannot start says so in its log and exits; the shell
/// around it does not, so look at the log. (Refusals of our own readiness
/// probes during start-up and recovery are logged as FATAL too, and are not
/// failures.)
fn server_failed(log: &Path) -> bool {
    const FAILURES: [&str; 4] = [
        "could not bind",
        "could not create any TCP/IP sockets",
        "could not create lock file",
        "is another postmaster",
    ];
    std::fs::read_to_string(log)
        .map(|text| FAILURES.iter().any(|f| text.contains(f)))
        .unwrap_or(false)
}

/// The directory of the newest server binaries under `installs` (Debian's
/// `/usr/lib/postgresql/<version>/bin`), else on `path`; else the install
/// hint.
fn server_binaries(installs: &Path, path: Option<std::ffi::OsString>) -> Result<PathBuf, String> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(installs)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    path.into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find(|dir| has_server(dir))
        .ok_or_else(|| INSTALL_HINT.to_string())
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The `postgres` system user if there is one, else `nobody`.
fn unprivileged_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let find = |name: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() > 3 && fields[0] == name {
                Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
            } else {
                None
            }
        })
    };
    find("postgres")
        .or_else(|| find("nobody"))
        .unwrap_or((65534, 65534))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

/// The server every test in this process shares: `FACTLINE_TEST_PG_URL`'s,
/// or a throwaway cluster started on first use.
fn shared_server() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => SharedServer::External(url),
        _ => SharedServer::Local(PgCluster::start(Durability::Throwaway)),
    })
}

enum SharedServer {
    External(String),
    Local(PgCluster),
}

impl SharedServer {
    fn url(&self, database: &str) -> String {
        match self {
            SharedServer::External(url) => with_database(url, database),
            SharedServer::Local(cluster) => cluster.url(database),
        }
    }
}

/// Replaces the database name in a `postgres://` URL.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// A database of its own for one test.
pub struct TestDatabase {
    /// Its connection URL.
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Its name on the cluster.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Creates an empty database on the shared server.
pub async fn database() -> TestDatabase {
    // Starting a cluster blocks for a few seconds; keep it off the runtime.
    let server = tokio::task::spawn_blocking(shared_server)
        .await
        .expect("starting the test server");
    create_database(&server.url("postgres")).await
}

/// Creates an empty database on the server that `admin_url` connects to.
pub async fn create_database(admin_url: &str) -> TestDatabase {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "factline_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let client = connect(admin_url).await;
    // Separate statements: CREATE DATABASE cannot share a transaction.
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("creating test database {name}: {e:?}"));
    }
    TestDatabase {
        url: with_database(admin_url, &name),
        name,
        admin_url: admin_url.to_string(),
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Only a server that outlives the tests needs tidying.
        if !matches!(shared_server_if_started(), Some(SharedServer::External(_))) {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
                        .await
                        .ok()?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

fn shared_server_if_started() -> Option<&'static SharedServer> {
    // `database()` is the only way to a TestDatabase on the shared server,
    // so a URL in the environment means it was used.
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(shared_server()),
        _ => None,
    }
}

/// Connects with `tokio-postgres`, driving the connection on the current
/// runtime. Panics with the server's message on failure.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:5/old?sslmode=disable", "new"),
            "postgres://u:p@h:5/new?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "new"), "postgres://h/new");
        assert_eq!(
            with_database("postgresql://h:1/", "n"),
            "postgresql://h:1/n"
        );
    }

    #[test]
    fn missing_server_binaries_name_the_package_to_install() {
        let empty = tempfile::tempdir().unwrap();
        let hint = server_binaries(empty.path(), Some(empty.path().into())).unwrap_err();
        assert!(hint.contains("apt-get install -y postgresql"), "{hint}");
        assert!(hint.contains("FACTLINE_TEST_PG_URL"), "{hint}");
        // With several versions installed, the newest is used.
        for version in ["13", "15"] {
            let bin = empty.path().join(version).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            for program in ["initdb", "postgres"] {
                std::fs::write(bin.join(program), "").unwrap();
            }
        }
        assert_eq!(
            server_binaries(empty.path(), None).unwrap(),
            empty.path().join("15/bin")
        );
    }

    #[tokio::test]
    async fn a_fresh_database_accepts_queries() {
        let db = database().await;
        let client = connect(&db.url).await;
        let row = client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), db.name());
    }

    #[test]
    fn a_durable_cluster_stops_and_restarts_with_its_data() {
        let cluster = PgCluster::start(Durability::Durable);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client = connect(&cluster.url("postgres")).await;
            client
                .batch_execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
                .await
                .unwrap();
        });
        cluster.stop(StopMode::Immediate);
        cluster.restart();
        runtime.block_on(async {
            let client = connect(&cluster.url("postgres")).await;
            let row = client.query_one("SELECT n FROM kept", &[]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), 7);
        });
    }
}
