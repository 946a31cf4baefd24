//! What the binary's tests share: a `--db` for each backend, running the
//! binary, and a `factline serve` child to talk to over HTTP.

#![allow(dead_code, unused_macros)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// A `--db` value and whatever keeps it alive for the test.
pub struct Db {
    pub spec: String,
    _guard: Box<dyn std::any::Any>,
}

pub fn sqlite_db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/factline.db");
    Db {
        spec: path.to_str().expect("temp paths are UTF-8").to_string(),
        _guard: Box::new(dir),
    }
}

pub fn postgres_db() -> Db {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = runtime.block_on(factline_testkit::pg::database());
    Db {
        spec: db.url.clone(),
        _guard: Box::new(db),
    }
}

/// Runs each named test (a `fn(Db)`) against both backends.
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $test() { super::$test(super::sqlite_db()) } )*
        }
        mod postgres {
            $( #[test] fn $test() { super::$test(super::postgres_db()) } )*
        }
    };
}

/// Writes a tokens file of one token with these scopes (JSON arrays of
/// categories) in `dir`; its path.
pub fn one_token_file(
    dir: &std::path::Path,
    name: &str,
    secret: &str,
    scopes: &str,
) -> std::path::PathBuf {
    let path = dir.join("tokens.json");
    std::fs::write(
        &path,
        format!(r#"{{"tokens":[{{"name":"{name}","token":"{secret}",{scopes}}}]}}"#),
    )
    .unwrap();
    path
}

pub fn factline(db: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_factline"));
    cmd.arg("--db").arg(db).env_remove("FACTLINE_DB");
    cmd
}

pub fn run(db: impl AsRef<OsStr>, args: &[&str]) -> Output {
    factline(db).args(args).output().unwrap()
}

pub fn run_with_stdin(db: impl AsRef<OsStr>, args: &[&str], stdin: &str) -> Output {
    let mut child = factline(db)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

pub fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Sends SIGTERM and checks the process stops cleanly.
pub fn terminate(child: &mut std::process::Child) {
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(
        child.wait().unwrap().success(),
        "it stops cleanly on SIGTERM"
    );
}

/// A child process killed when dropped if it still runs, so a test that
/// fails (or forgets to stop it) leaves no server behind.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A `factline serve` child and what it printed when it came up.
pub struct Served {
    pub child: KillOnDrop,
    pub base: String,
    /// Everything it wrote to stderr so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub runtime: tokio::runtime::Runtime,
    pub client: reqwest::Client,
}

/// Starts `factline serve` with `args` and waits for its serving line:
/// the child, its base URL, and its stderr lines so far (kept up to date).
#[allow(clippy::type_complexity)]
pub fn spawn_serving(
    db: &str,
    args: &[&str],
) -> (
    std::process::Child,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut child = factline(db)
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            kept.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let base = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_else(|e| {
                panic!(
                    "factline serve says where it serves ({e}); it said:\n{}",
                    log.lock().unwrap().join("\n")
                )
            });
        if let Some(at) = line.find(" on http://") {
            let rest = &line[at + 4..];
            break rest[..rest.find(' ').unwrap_or(rest.len())].to_owned();
        }
    };
    (child, base, log)
}

impl Served {
    pub fn start(db: &str, args: &[&str]) -> Served {
        let (child, base, log) = spawn_serving(db, args);
        Served {
            child: KillOnDrop(child),
            base,
            log,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client: reqwest::Client::new(),
        }
    }

    pub fn call(&self, method: &str, path: &str, token: &str, body: Option<&str>) -> (u16, Value) {
        self.call_with(method, path, token, body, &[])
    }

    pub fn call_with(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        self.runtime.block_on(async {
            let url = format!("{}{path}", self.base);
            let mut request = match method {
                "POST" => self
                    .client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body.unwrap_or("").to_owned()),
                _ => self.client.get(url),
            };
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if !token.is_empty() {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        })
    }

    /// The body of a GET as text, whatever it holds; panics unless 200.
    pub fn text(&self, path: &str) -> String {
        self.runtime.block_on(async {
            let response = self
                .client
                .get(format!("{}{path}", self.base))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let text = response.text().await.unwrap();
            assert_eq!(status, 200, "GET {path}: {text}");
            text
        })
    }

    /// Polls `path` until `done` holds of its answer.
    pub fn until(&self, path: &str, token: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.call("GET", path, token, None);
            if status == 200 && done(&body) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} never got there: {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn projection<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {list}"))
}

/// How many events `read-all` prints.
pub fn count_all(db: impl AsRef<OsStr>) -> usize {
    json_lines(&run(db, &["read-all"])).len()
}

pub fn assert_nothing_differs(diff: &Value) {
    let tables = diff["tables"].as_array().expect("a diff report");
    assert!(
        !tables.is_empty()
            && tables
                .iter()
                .all(|t| t["added"] == 0 && t["removed"] == 0 && t["changed"] == 0),
        "{diff}"
    );
}

/// The projection entry of `list --json` called `name`.
pub fn listed(db: &str, name: &str) -> Value {
    let out = run(db, &["projections", "list", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let all = json_lines(&out).remove(0);
    all.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {all}"))
        .clone()
}
