//! A throwaway `nats-server` with JetStream, for `factline bench outbox`
//! and the tests: a free port on loopback and a temporary store directory.

use std::io::{Error, ErrorKind};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Says what to install when the server binary is missing.
pub const INSTALL_HINT: &str =
    "nats-server is not installed: install it (Debian: apt-get install -y nats-server) or set FACTLINE_NATS_SERVER to its path";

/// A running `nats-server -js`, killed when dropped.
pub struct LocalNatsServer {
    binary: PathBuf,
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

/// The `nats-server` binary: `FACTLINE_NATS_SERVER`, the `PATH`, or
/// Debian's `/usr/sbin` (not on a non-root user's `PATH`).
pub fn find_nats_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FACTLINE_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([
            "/usr/sbin".into(),
            "/usr/bin".into(),
            "/usr/local/bin".into(),
        ])
        .map(|dir: PathBuf| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

impl LocalNatsServer {
    /// Starts a server and waits until it accepts connections.
    /// A missing binary is [`ErrorKind::NotFound`] saying what to install.
    pub fn start() -> Result<Self, Error> {
        let binary =
            find_nats_server().ok_or_else(|| Error::new(ErrorKind::NotFound, INSTALL_HINT))?;
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())?
            .port();
        let store = tempfile::tempdir()?;
        let mut server = LocalNatsServer {
            binary,
            port,
            store,
            child: None,
        };
        server.restart()?;
        Ok(server)
    }

    /// Its `nats://` URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL (no clean shutdown) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        let child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                Error::new(e.kind(), format!("starting {}: {e}", self.binary.display()))
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(Error::other(format!(
                    "nats-server exited at start: {status}"
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("nats-server did not listen on {} within 15 s", self.port),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for LocalNatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
