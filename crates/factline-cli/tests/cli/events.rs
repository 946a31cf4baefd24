//! Appends, reads and their contract: output fields, exit codes, idempotent retries, batches, paging, several processes on one store.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

on_every_backend!(
    append_prints_the_result_contract,
    exit_codes_follow_the_contract,
    idempotent_retry_through_the_cli,
    batch_appends_atomically_and_refuses_bad_lines_whole,
    reads_print_recorded_events_with_the_contract_fields,
    reads_page_through_long_streams,
    concurrent_processes_append_to_one_store,
    tail_follows_appends_from_other_processes,
);

fn append_prints_the_result_contract(db: Db) {
    let out = run(
        &db.spec,
        &[
            "append",
            "Order-1",
            "--type",
            "OrderPlaced",
            "--data",
            r#"{"total":5}"#,
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let r = &lines[0];
    let mut keys: Vec<_> = r.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "first_position",
            "first_version",
            "last_position",
            "last_version",
            "stream_id"
        ]
    );
    assert_eq!(r["stream_id"], "Order-1");
    assert_eq!(
        (r["first_version"].as_u64(), r["last_position"].as_u64()),
        (Some(1), Some(1))
    );
}

fn exit_codes_follow_the_contract(db: Db) {
    let p = &db.spec;
    assert_eq!(code(&run(p, &["append", "Order-1", "--type", "A"])), 0);
    // 3: conflict, naming expected and actual.
    for (expected, named) in [("5", "expected 5"), ("no_stream", "expected no_stream")] {
        let out = run(
            p,
            &[
                "append",
                "Order-1",
                "--type",
                "A",
                "--expected-version",
                expected,
            ],
        );
        assert_eq!(code(&out), 3, "{}", stderr(&out));
        assert!(
            stderr(&out).contains(named) && stderr(&out).contains("actual 1"),
            "{}",
            stderr(&out)
        );
    }
    // 4: an event id reused in another stream.
    let id = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    assert_eq!(
        code(&run(
            p,
            &["append", "Order-2", "--type", "A", "--event-id", id]
        )),
        0
    );
    let out = run(p, &["append", "Order-3", "--type", "A", "--event-id", id]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    // 2: every kind of invalid input, each with a message and nothing written.
    let before = count_all(p);
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(70_000));
    let invalid: Vec<Vec<&str>> = vec![
        vec!["append", "", "--type", "A"],
        vec!["append", "$all", "--type", "A"],
        vec!["append", "Order-9", "--type", "A", "--data", "{not json"],
        vec![
            "append",
            "Order-9",
            "--type",
            "A",
            "--metadata",
            r#"{"unknown":1}"#,
        ],
        vec![
            "append",
            "Order-9",
            "--type",
            "A",
            "--event-id",
            "not-a-uuid",
        ],
        vec![
            "append",
            "Order-9",
            "--type",
            "A",
            "--expected-version",
            "latest",
        ],
        vec!["append", "Order-9", "--type", "", "--data", "{}"],
        vec!["append", "Order-9", "--type", "Big", "--data", &big],
        vec!["append", "Order-9"],
        vec!["read-category", "Order-9"],
        vec!["no-such-command"],
    ];
    for args in invalid {
        let out = run(p, &args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(
            !stderr(&out).trim().is_empty(),
            "{args:?} printed no message"
        );
    }
    assert_eq!(count_all(p), before);
}

/// Exit code 1: a failure that is not the input's fault.
#[test]
fn unusable_databases_exit_with_1() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let out = run(blocker.join("sub/db"), &["read-all"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    // Nothing listens on a port we just had bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let out = run(
        format!("postgres://postgres@127.0.0.1:{port}/x"),
        &["read-all"],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("connecting to PostgreSQL"),
        "{}",
        stderr(&out)
    );
}

fn idempotent_retry_through_the_cli(db: Db) {
    let id = "6fa459ea-ee8a-3ca4-894e-db77e160355e";
    let args = [
        "append",
        "Order-1",
        "--type",
        "A",
        "--event-id",
        id,
        "--expected-version",
        "no_stream",
    ];
    let first = run(&db.spec, &args);
    let again = run(&db.spec, &args);
    assert_eq!((code(&first), code(&again)), (0, 0), "{}", stderr(&again));
    assert_eq!(json_lines(&first), json_lines(&again));
    assert_eq!(count_all(&db.spec), 1);
    // The same id with another payload is not a retry: exit 4.
    let mut changed = args.to_vec();
    changed.extend(["--data", r#"{"other":true}"#]);
    let out = run(&db.spec, &changed);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another type, data or metadata"),
        "{}",
        stderr(&out)
    );
    assert_eq!(count_all(&db.spec), 1);
}

fn batch_appends_atomically_and_refuses_bad_lines_whole(db: Db) {
    let good = "{\"type\":\"A\",\"data\":{\"n\":1}}\n{\"type\":\"B\",\"metadata\":{\"correlation_id\":\"c-1\",\"headers\":{\"k\":\"v\"}}}\n";
    let out = run_with_stdin(&db.spec, &["append", "Order-1", "--batch"], good);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = &json_lines(&out)[0];
    assert_eq!(
        (r["first_version"].as_u64(), r["last_version"].as_u64()),
        (Some(1), Some(2))
    );
    let bad = "{\"type\":\"C\"}\n{\"type\":\"D\",\"bogus\":1}\n";
    let out = run_with_stdin(&db.spec, &["append", "Order-1", "--batch"], bad);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));
    let events = json_lines(&run(&db.spec, &["read", "Order-1"]));
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["metadata"]["correlation_id"], "c-1");
    assert_eq!(events[1]["metadata"]["headers"]["k"], "v");
}

fn reads_print_recorded_events_with_the_contract_fields(db: Db) {
    for i in 0..5 {
        let stream = if i % 2 == 0 { "Order-1" } else { "Customer-1" };
        let data = format!("{{\"i\":{i}}}");
        assert_eq!(
            code(&run(
                &db.spec,
                &["append", stream, "--type", "T", "--data", &data]
            )),
            0
        );
    }
    let all = json_lines(&run(&db.spec, &["read-all"]));
    assert_eq!(all.len(), 5);
    for e in &all {
        for key in [
            "stream_id",
            "version",
            "position",
            "event_id",
            "event_type",
            "data",
            "metadata",
            "recorded_at",
        ] {
            assert!(e.get(key).is_some(), "{key} missing in {e}");
        }
    }
    let positions = |v: &[Value]| {
        v.iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(positions(&all), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        positions(&json_lines(&run(
            &db.spec,
            &["read-all", "--from", "2", "--limit", "2"]
        ))),
        vec![2, 3]
    );
    assert_eq!(
        positions(&json_lines(&run(&db.spec, &["read-category", "Order"]))),
        vec![1, 3, 5]
    );
    assert_eq!(
        positions(&json_lines(&run(
            &db.spec,
            &["read-category", "Order", "--from", "2"]
        ))),
        vec![3, 5]
    );
    let versions = |v: &[Value]| {
        v.iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        versions(&json_lines(&run(&db.spec, &["read", "Order-1"]))),
        vec![1, 2, 3]
    );
    assert_eq!(
        versions(&json_lines(&run(
            &db.spec,
            &["read", "Order-1", "--backwards"]
        ))),
        vec![3, 2, 1]
    );
    assert_eq!(
        versions(&json_lines(&run(
            &db.spec,
            &["read", "Order-1", "--backwards", "--from", "2"]
        ))),
        vec![2, 1]
    );
    assert_eq!(
        versions(&json_lines(&run(
            &db.spec,
            &["read", "Order-1", "--from", "2", "--limit", "1"]
        ))),
        vec![2]
    );
    assert!(json_lines(&run(&db.spec, &["read", "Order-404"])).is_empty());
}

fn reads_page_through_long_streams(db: Db) {
    let lines: String = (0..2_500)
        .map(|i| format!("{{\"type\":\"T\",\"data\":{i}}}\n"))
        .collect();
    assert_eq!(
        code(&run_with_stdin(
            &db.spec,
            &["append", "Order-1", "--batch"],
            &lines
        )),
        0
    );
    assert_eq!(
        json_lines(&run(&db.spec, &["read", "Order-1"])).len(),
        2_500
    );
    let back = json_lines(&run(
        &db.spec,
        &["read", "Order-1", "--backwards", "--limit", "1500"],
    ));
    assert_eq!(back.len(), 1_500);
    assert_eq!(back[1_499]["version"], 1_001);
    assert_eq!(
        json_lines(&run(
            &db.spec,
            &["read-all", "--from", "100", "--limit", "2000"]
        ))
        .len(),
        2_000
    );
}

/// Several OS processes appending to one store at once: positions and
/// versions stay gap-free and ordered.
fn concurrent_processes_append_to_one_store(db: Db) {
    // Create the store first so the processes do not race on creating it.
    assert_eq!(code(&run(&db.spec, &["read-all"])), 0);
    let children: Vec<_> = (0..8)
        .map(|p| {
            let mut child = factline(&db.spec)
                .args(["append", "Shared-1", "--batch"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let lines: String = (0..200)
                .map(|i| format!("{{\"type\":\"T\",\"data\":{{\"p\":{p},\"i\":{i}}}}}\n"))
                .collect();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(lines.as_bytes())
                .unwrap();
            child
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let events = json_lines(&run(&db.spec, &["read", "Shared-1"]));
    assert_eq!(events.len(), 1_600);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["version"], i as u64 + 1);
        assert_eq!(e["position"], i as u64 + 1);
        // Each process's batch landed as one contiguous run.
        assert_eq!(e["data"]["p"], events[i - i % 200]["data"]["p"]);
        assert_eq!(e["data"]["i"], (i % 200) as u64);
    }
}

fn tail_follows_appends_from_other_processes(db: Db) {
    assert_eq!(
        code(&run(&db.spec, &["append", "Order-0", "--type", "Old"])),
        0
    );
    let mut tail = factline(&db.spec)
        .args(["tail", "--category", "Order", "--from", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || -> Value {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("tail printed nothing");
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(next()["event_type"], "Old");
    assert_eq!(
        code(&run(
            &db.spec,
            &["append", "Customer-1", "--type", "Skipped"]
        )),
        0
    );
    assert_eq!(
        code(&run(&db.spec, &["append", "Order-1", "--type", "New"])),
        0
    );
    let live = next();
    assert_eq!(live["event_type"], "New");
    assert_eq!(live["position"], 3);
    tail.kill().unwrap();
    tail.wait().unwrap();
}
