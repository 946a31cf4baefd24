//! What an operator exposing a server expects of the binary: odd flag
//! values are usage errors (never a panic), files are private, refusals
//! are visible in the default log.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn huge_tiny_and_odd_durations_are_usage_errors() {
    let db = sqlite_db();
    for flags in [
        ["--request-timeout", "1e20"],
        ["--request-timeout", "0"],
        ["--request-timeout", "NaN"],
        ["--heartbeat", "1e20"],
        ["--heartbeat", "0.001"],
        ["--heartbeat", "-1"],
        ["--heartbeat", "inf"],
        ["--header-timeout", "0"],
        ["--header-timeout", "1e30"],
        ["--max-connections", "0"],
        ["--max-subscriptions", "0"],
        ["--max-subscriptions-per-token", "0"],
        ["--max-page-bytes", "0"],
        ["--max-concurrent-reads", "0"],
    ] {
        let flag = format!("{}={}", flags[0], flags[1]);
        let out = run(&db.spec, &["serve", "--listen", "127.0.0.1:0", &flag]);
        assert_eq!(code(&out), 2, "{flags:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(flags[0]), "{}", stderr(&out));
    }
    for duration in ["1e20", "0", "-5"] {
        let flag = format!("--duration={duration}");
        let out = run(&db.spec, &["demo", &flag, "--sink", "none"]);
        assert_eq!(code(&out), 2, "--duration {duration}: {}", stderr(&out));
        assert!(stderr(&out).contains("--duration"), "{}", stderr(&out));
    }
}

#[test]
fn sqlite_uris_are_refused_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("x.db");
    let uri = format!("file:{}?mode=rwc", target.display());
    let out = factline(&uri)
        .current_dir(dir.path())
        .args(["append", "Order-1", "--type", "A"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("file: URI"), "{}", stderr(&out));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing is created: {left:?}");
}

#[cfg(unix)]
#[test]
fn database_files_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let db = sqlite_db();
    let out = run(&db.spec, &["demo", "--orders", "3", "--sink", "none"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let dir = std::path::Path::new(&db.spec).parent().unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.contains(".db") {
            continue;
        }
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
        checked += 1;
    }
    assert!(checked >= 1, "the store's files were checked");
}

#[test]
fn refused_requests_are_logged_at_the_default_level() {
    let db = sqlite_db();
    let dir = tempfile::tempdir().unwrap();
    let secret = "reader-only-0123456789";
    let tokens = one_token_file(dir.path(), "reader", secret, r#""read":["Order"]"#);
    let served = Served::start(
        &db.spec,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            tokens.to_str().unwrap(),
        ],
    );
    assert_eq!(served.call("GET", "/all", "", None).0, 401);
    let body = Some(r#"{"type":"A"}"#);
    assert_eq!(served.call("POST", "/streams/Order-1", secret, body).0, 403);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = served.log.lock().unwrap().clone();
        let refused: Vec<&String> = log
            .iter()
            .filter(|l| l.contains("request refused"))
            .collect();
        assert!(
            !log.iter().any(|l| l.contains(secret)),
            "a token was logged"
        );
        if refused.len() >= 2 {
            assert!(
                refused
                    .iter()
                    .any(|l| l.contains("401") && l.contains("/all")),
                "{refused:?}"
            );
            assert!(
                refused
                    .iter()
                    .any(|l| l.contains("403") && l.contains("/streams/Order-1")),
                "{refused:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no refusal in the log: {log:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let Served { mut child, .. } = served;
    terminate(&mut child);
}

/// Each connection holds a file; the server starts with the soft limit
/// raised to the hard one, whatever it was started with.
#[cfg(target_os = "linux")]
#[test]
fn the_server_raises_its_soft_open_files_limit() {
    use std::io::{BufRead, BufReader};
    let db = sqlite_db();
    let mut child = std::process::Command::new("sh")
        .args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_factline"))
        .args(["--db", &db.spec, "serve", "--listen", "127.0.0.1:0"])
        .env_remove("FACTLINE_DB")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (up, serving) = std::sync::mpsc::channel();
    // Drained to the end, so the server never writes to a closed pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(" on http://") {
                let _ = up.send(());
            }
        }
    });
    serving
        .recv_timeout(Duration::from_secs(30))
        .expect("the server comes up");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "soft is hard: {open_files}");
    assert_ne!(numbers[0], "256", "{open_files}");
    terminate(&mut child);
}

/// The server's peak resident memory, from the kernel.
#[cfg(target_os = "linux")]
fn peak_rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024
}

/// Pages are capped by bytes and reads by number, so eight clients asking
/// at once for a thousand 60 KB events each leave the server small.
#[cfg(target_os = "linux")]
#[test]
fn concurrent_pages_of_large_events_take_bounded_memory() {
    let db = sqlite_db();
    let pad = "x".repeat(60 * 1024 - 100);
    let lines: String = (0..250)
        .map(|i| format!("{{\"type\":\"Big\",\"data\":{{\"i\":{i},\"pad\":\"{pad}\"}}}}\n"))
        .collect();
    for stream in ["Big-1", "Big-2", "Big-3", "Big-4"] {
        let out = run_with_stdin(&db.spec, &["append", stream, "--batch"], &lines);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let served = Served::start(&db.spec, &["--listen", "127.0.0.1:0"]);
    let pid = served.child.id();
    let before = peak_rss_mb(pid);
    let pages: Vec<usize> = served.runtime.block_on(async {
        let asks = (0..8).map(|i| {
            let client = served.client.clone();
            let url = format!("{}/all?from={}&limit=1000", served.base, 1 + (i % 8) * 100);
            tokio::spawn(async move {
                let text = client.get(url).send().await.unwrap().text().await.unwrap();
                let page: serde_json::Value = serde_json::from_str(&text).unwrap();
                page["events"].as_array().unwrap().len()
            })
        });
        let mut sizes = Vec::new();
        for ask in asks.collect::<Vec<_>>() {
            sizes.push(ask.await.unwrap());
        }
        sizes
    });
    assert!(
        pages.iter().all(|&n| n > 0 && n < 1000),
        "pages end by bytes: {pages:?}"
    );
    let peak = peak_rss_mb(pid);
    eprintln!("peak resident memory: {before} MB before the reads, {peak} MB after");
    assert!(peak < 300, "the server reached {peak} MB");
    let Served { mut child, .. } = served;
    terminate(&mut child);
}

/// A SIGTERM sent as soon as the server says it serves stops it cleanly:
/// its signal handlers are in place before that line.
#[test]
fn sigterm_right_after_the_serving_line_stops_cleanly() {
    let db = sqlite_db();
    for _ in 0..10 {
        let Served { mut child, .. } = Served::start(&db.spec, &["--listen", "127.0.0.1:0"]);
        terminate(&mut child);
    }
}
