//! The CLI contract: output shapes and exit codes, checked on the real
//! binary, once with a SQLite file and once with a PostgreSQL URL as `--db`.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

#[macro_use]
mod common;
use common::*;

on_every_backend!(
    append_prints_the_result_contract,
    exit_codes_follow_the_contract,
    idempotent_retry_through_the_cli,
    batch_appends_atomically_and_refuses_bad_lines_whole,
    reads_print_recorded_events_with_the_contract_fields,
    reads_page_through_long_streams,
    concurrent_processes_append_to_one_store,
    tail_follows_appends_from_other_processes,
    demo_appends_orders_and_reports_them,
    projections_are_listed_rebuilt_paused_and_resumed,
    a_live_read_model_follows_a_rebuild_swapped_in_by_another_process,
    poison_events_are_parked_listed_retried_and_skipped,
    partitions_change_by_a_rebuild_and_live_runners_run_them,
    the_outbox_is_configured_and_relayed_through_the_cli,
    the_server_runs_the_api_the_admin_api_and_the_relay,
    the_demo_runs_until_interrupted_and_continues_from_its_data,
);

fn count_all(db: impl AsRef<OsStr>) -> usize {
    json_lines(&run(db, &["read-all"])).len()
}

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

fn demo_appends_orders_and_reports_them(db: Db) {
    let out = run(&db.spec, &["demo", "--orders", "10"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Revenue by region"), "{text}");
    assert!(text.contains("refused by the rules"), "{text}");
    let events = json_lines(&run(&db.spec, &["read-category", "Order"]));
    let placed = events
        .iter()
        .filter(|e| e["event_type"] == "OrderPlaced")
        .count();
    assert_eq!(placed, 10);
    // The order-list read model followed along: its statuses cover them all.
    let by_status: u64 = text
        .split("Orders by status")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .map(|block| {
            block
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(by_status, 10, "{text}");
    let customers = json_lines(&run(&db.spec, &["read-category", "Customer"]));
    assert_eq!(customers.len(), 12, "the demo registers 12 customers");
    // Every order's life starts with its placement.
    for e in &events {
        let first = events.iter().find(|f| f["stream_id"] == e["stream_id"]);
        assert_eq!(first.map(|f| &f["event_type"]), Some(&json!("OrderPlaced")));
    }
    // An order's events share one correlation id.
    let first_stream = &events[0]["stream_id"];
    let corr: Vec<_> = events
        .iter()
        .filter(|e| &e["stream_id"] == first_stream)
        .map(|e| e["metadata"]["correlation_id"].clone())
        .collect();
    assert!(corr.len() >= 2 && corr.iter().all(|c| c == &corr[0] && c.is_string()));
}

/// A rebuild's diff report found no row added, removed or changed.
fn assert_nothing_differs(diff: &Value) {
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
fn listed(db: &str, name: &str) -> Value {
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

fn projections_are_listed_rebuilt_paused_and_resumed(db: Db) {
    let db = &db.spec;
    assert_eq!(code(&run(db, &["demo", "--orders", "15"])), 0);
    let head = count_all(db) as u64;
    for name in ["order_list", "revenue", "customer_totals"] {
        let p = listed(db, name);
        assert_eq!(p["active_version"], 1, "{p}");
        assert_eq!(
            (p["checkpoint"].as_u64(), p["head"].as_u64()),
            (Some(head), Some(head))
        );
        assert_eq!(
            (&p["events_behind"], &p["state"]),
            (&json!(0), &json!("active"))
        );
    }
    let table = run(db, &["projections", "list"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.starts_with("NAME") && text.contains("revenue"),
        "{text}"
    );

    // A rebuild that stops for review: the diff against the active
    // version (the same code, so nothing differs), and no swap.
    let out = run(
        db,
        &[
            "projections",
            "rebuild",
            "revenue",
            "--diff",
            "--no-swap",
            "--quiet",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = json_lines(&out);
    let diff = &lines[0]["diff"];
    assert_eq!(
        (&diff["active"], &diff["candidate"]),
        (&json!(1), &json!(2)),
        "{diff}"
    );
    assert_nothing_differs(diff);
    let report = &lines[1];
    assert_eq!(
        (&report["version"], &report["swapped"]),
        (&json!(2), &json!(false)),
        "{report}"
    );
    assert_eq!(report["checkpoint"].as_u64(), Some(head));
    let p = listed(db, "revenue");
    assert_eq!(
        (&p["active_version"], &p["state"]),
        (&json!(1), &json!("rebuilding")),
        "{p}"
    );

    // Running it again resumes the stopped rebuild and swaps it in.
    let out = run(db, &["projections", "rebuild", "revenue", "--quiet"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = json_lines(&out).remove(0);
    assert_eq!(
        (&report["version"], &report["previous_version"]),
        (&json!(2), &json!(1)),
        "{report}"
    );
    assert_eq!(
        (&report["events"], &report["swapped"]),
        (&json!(0), &json!(true)),
        "{report}"
    );
    let p = listed(db, "revenue");
    assert_eq!(
        (&p["active_version"], &p["state"]),
        (&json!(2), &json!("active")),
        "{p}"
    );
    assert_eq!(
        p["versions"].as_array().unwrap().len(),
        1,
        "version 1 was dropped: {p}"
    );

    // Pause and resume, shown by status.
    let out = run(db, &["projections", "pause", "order_list"]);
    assert_eq!(json_lines(&out)[0]["state"], "paused", "{}", stderr(&out));
    let status = json_lines(&run(db, &["projections", "status", "order_list"])).remove(0);
    assert_eq!(status["state"], "paused", "{status}");
    // A paused read model falls behind while commands go on...
    let out = run(
        db,
        &[
            "append",
            "Order-x",
            "--type",
            "OrderPlaced",
            "--data",
            r#"{"customer_id":"c","region":"r","lines":[],"total_cents":0,"currency":"EUR"}"#,
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    run(db, &["projections", "resume", "order_list"]);
    let status = json_lines(&run(db, &["projections", "status", "order_list"])).remove(0);
    assert_eq!(
        (&status["state"], &status["events_behind"]),
        (&json!("active"), &json!(1)),
        "{status}"
    );
    // ...and catches up when it runs again.
    assert_eq!(code(&run(db, &["demo", "--orders", "1"])), 0);
    let status = json_lines(&run(db, &["projections", "status", "order_list"])).remove(0);
    assert_eq!(status["events_behind"], 0, "{status}");

    // Bad requests are usage errors (exit 2) that name the problem.
    for args in [
        &["projections", "rebuild", "nope"][..],
        &["projections", "status", "nope"],
        &["projections", "discard", "revenue"],
        &["projections", "skip", "revenue", "1"],
        &["projections", "rebuild", "revenue", "--rate", "0"],
    ] {
        let out = run(db, args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("error: "),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = run("memory:", &["projections", "list"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

/// A demo runs while another process rebuilds the revenue read model and
/// swaps it in: the demo's runner moves to the new version and keeps it
/// up to date, which a second rebuild's diff confirms (nothing differs).
fn a_live_read_model_follows_a_rebuild_swapped_in_by_another_process(db: Db) {
    let db = &db.spec;
    assert_eq!(code(&run(db, &["demo", "--orders", "20"])), 0);
    let demo = factline(db)
        .args(["demo", "--orders", "120", "--rate", "40"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let out = run(db, &["projections", "rebuild", "revenue", "--quiet"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = json_lines(&out).remove(0);
    assert_eq!(
        (&report["version"], &report["swapped"]),
        (&json!(2), &json!(true))
    );
    let demo = demo.wait_with_output().unwrap();
    assert_eq!(code(&demo), 0, "{}", stderr(&demo));
    let text = String::from_utf8_lossy(&demo.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("revenue "));
    assert!(line.is_some_and(|l| l.contains(" 0 behind")), "{text}");
    let head = count_all(db) as u64;
    let p = listed(db, "revenue");
    assert_eq!(
        (&p["active_version"], p["checkpoint"].as_u64()),
        (&json!(2), Some(head)),
        "{p}"
    );
    assert!(
        report["checkpoint"].as_u64().unwrap() < head,
        "the swap came while orders were placed"
    );
    let out = run(
        db,
        &[
            "projections",
            "rebuild",
            "revenue",
            "--diff",
            "--no-swap",
            "--quiet",
        ],
    );
    let diff = &json_lines(&out)[0]["diff"];
    assert_nothing_differs(diff);
}

fn poison_events_are_parked_listed_retried_and_skipped(db: Db) {
    let db = &db.spec;
    assert_eq!(code(&run(db, &["demo", "--orders", "5"])), 0);
    // An order placed by a buggy client: no projection can read it.
    let out = run(
        db,
        &[
            "append",
            "Order-bad",
            "--type",
            "OrderPlaced",
            "--data",
            r#"{"oops":true}"#,
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let bad = json_lines(&out)[0]["first_position"].as_u64().unwrap();
    let out = run(
        db,
        &[
            "append",
            "Order-bad",
            "--type",
            "OrderPaid",
            "--data",
            r#"{"amount_cents":1,"method":"card"}"#,
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The read models park it (and its stream's later event) and go on.
    let out = run(db, &["demo", "--orders", "3"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let head = count_all(db) as u64;
    let p = listed(db, "order_list");
    assert_eq!(
        (p["checkpoint"].as_u64(), &p["parked"]),
        (Some(head), &json!(2)),
        "{p}"
    );
    let parked = json_lines(&run(db, &["projections", "parked", "order_list"]));
    assert_eq!(parked.len(), 2);
    assert_eq!(
        (parked[0]["position"].as_u64(), &parked[0]["stream_id"]),
        (Some(bad), &json!("Order-bad"))
    );
    assert!(
        parked[0]["error"].as_str().unwrap().contains("OrderPlaced"),
        "{}",
        parked[0]
    );
    assert_eq!(parked[0]["attempts"], 3);
    assert_eq!(parked[1]["attempts"], 0, "held back behind the first");
    // A retry still fails on the bad event and keeps its stream in order.
    let out = run(db, &["projections", "retry", "order_list"]);
    assert_eq!(json_lines(&out)[0]["still_parked"], 2, "{}", stderr(&out));
    // Skipping it lets the retry apply the payment behind it.
    let out = run(db, &["projections", "skip", "order_list", &bad.to_string()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(db, &["projections", "retry", "order_list"]);
    let report = json_lines(&out).remove(0);
    assert_eq!(
        (&report["applied"], &report["still_parked"]),
        (&json!(1), &json!(0)),
        "{report}"
    );
    assert!(json_lines(&run(db, &["projections", "parked", "order_list"])).is_empty());
    let p = listed(db, "order_list");
    assert_eq!((&p["parked"], &p["skipped"]), (&json!(0), &json!(1)), "{p}");
}

/// A read model rebuilt as 3 partitions is kept up to date by the demo as
/// 3 partitions, and equals a rebuild from scratch as one.
fn partitions_change_by_a_rebuild_and_live_runners_run_them(db: Db) {
    let db = &db.spec;
    assert_eq!(code(&run(db, &["demo", "--orders", "15"])), 0);
    let out = run(
        db,
        &[
            "projections",
            "rebuild",
            "customer_totals",
            "--partitions",
            "3",
            "--quiet",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = json_lines(&out).remove(0);
    assert_eq!(
        (&report["partitions"], &report["swapped"]),
        (&json!(3), &json!(true))
    );
    let p = listed(db, "customer_totals");
    assert_eq!(p["versions"][0]["partitions"], 3, "{p}");

    let out = run(db, &["demo", "--orders", "25", "--concurrency", "8"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("customer_totals "));
    assert!(line.is_some_and(|l| l.contains(" 0 behind")), "{text}");
    let head = count_all(db) as u64;
    assert_eq!(
        listed(db, "customer_totals")["checkpoint"].as_u64(),
        Some(head)
    );

    // A resumed rebuild keeps its count; asking for another is refused.
    let out = run(
        db,
        &[
            "projections",
            "rebuild",
            "customer_totals",
            "--partitions",
            "1",
            "--diff",
            "--no-swap",
            "--quiet",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines = json_lines(&out);
    let diff = &lines[0]["diff"];
    assert_nothing_differs(diff);
    assert_eq!(lines[1]["partitions"], 1);
    let out = run(
        db,
        &[
            "projections",
            "rebuild",
            "customer_totals",
            "--partitions",
            "2",
        ],
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("runs as 1 partition"),
        "{}",
        stderr(&out)
    );
    let out = run(
        db,
        &[
            "projections",
            "rebuild",
            "customer_totals",
            "--partitions",
            "0",
        ],
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

fn the_outbox_is_configured_and_relayed_through_the_cli(db: Db) {
    let db = &db.spec;
    // Bad input is refused with exit code 2 and nothing stored.
    let nothing = run(db, &["outbox", "publish"]);
    assert_eq!(code(&nothing), 2, "{}", stderr(&nothing));
    let bad = run(
        db,
        &[
            "outbox",
            "publish",
            "--category",
            "Order",
            "--subject",
            "a.{x}",
        ],
    );
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("{x}"), "{}", stderr(&bad));
    let bad_sink = run(db, &["relay", "--sink", "kafka://x"]);
    assert_eq!(code(&bad_sink), 2, "{}", stderr(&bad_sink));
    assert!(json_lines(&run(db, &["outbox", "publications"])).is_empty());

    let out = run(
        db,
        &[
            "outbox",
            "publish",
            "--category",
            "Order",
            "--subject",
            "shop.{category}.{event_type}",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let publication = &json_lines(&out)[0];
    assert_eq!(publication["category"], "Order");
    assert_eq!(publication["subject"], "shop.{category}.{event_type}");
    for (stream, kind) in [
        ("Order-1", "OrderPlaced"),
        ("Customer-1", "Registered"),
        ("Order-1", "OrderPaid"),
    ] {
        assert_eq!(code(&run(db, &["append", stream, "--type", kind])), 0);
    }
    let status = &json_lines(&run(db, &["outbox", "status"]))[0];
    assert_eq!(status["backlog"], 2, "{status}");
    assert!(status["oldest_age_s"].as_f64().unwrap() >= 0.0);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.jsonl");
    let mut relay = factline(db)
        .args([
            "relay",
            "--sink",
            &format!("file://{}", file.display()),
            "--relay-id",
            "cli",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read_lines = || -> Vec<Value> {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let mut waited = 0;
    while read_lines().len() < 2 {
        assert!(waited < 300, "the relay published nothing");
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    // Appended while the relay runs (by another process): relayed too.
    assert_eq!(
        code(&run(db, &["append", "Order-1", "--type", "OrderShipped"])),
        0
    );
    while read_lines().len() < 3 {
        assert!(waited < 600, "the relay missed a later append");
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let status = &json_lines(&run(db, &["outbox", "status"]))[0];
    assert_eq!(status["relays"][0]["relay"], "cli", "{status}");
    terminate(&mut relay);

    let lines = read_lines();
    let subjects: Vec<&str> = lines
        .iter()
        .map(|l| l["subject"].as_str().unwrap())
        .collect();
    assert_eq!(
        subjects,
        [
            "shop.Order.OrderPlaced",
            "shop.Order.OrderPaid",
            "shop.Order.OrderShipped"
        ]
    );
    assert!(lines.iter().all(|l| l["event"]["stream_id"] == "Order-1"));
    let versions: Vec<u64> = lines
        .iter()
        .map(|l| l["event"]["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    let status = &json_lines(&run(db, &["outbox", "status"]))[0];
    assert_eq!(status["backlog"], 0, "{status}");
    assert_eq!(
        status["relays"],
        json!([]),
        "a stopped relay gives its lanes back"
    );
    assert_eq!(status["published_retained"], 3);

    // The stdout sink prints the same lines.
    assert_eq!(
        code(&run(db, &["append", "Order-1", "--type", "OrderClosed"])),
        0
    );
    let mut relay = factline(db)
        .args(["relay", "--sink", "stdout"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(relay.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let line: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(line["subject"], "shop.Order.OrderClosed");
    assert_eq!(line["event"]["version"], 4);
    terminate(&mut relay);

    let id = publication["id"].to_string();
    assert_eq!(code(&run(db, &["outbox", "unpublish", &id])), 0);
    assert_eq!(code(&run(db, &["outbox", "unpublish", &id])), 2);
}

fn the_server_runs_the_api_the_admin_api_and_the_relay(db: Db) {
    let db = &db.spec;
    let dir = tempfile::tempdir().unwrap();
    // Anything but loopback needs tokens or an explicit --allow-anonymous.
    let out = run(db, &["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("--tokens"), "{}", stderr(&out));
    // ...and with it, everyone may.
    let open = Served::start(db, &["--listen", "0.0.0.0:0", "--allow-anonymous"]);
    let open = Served {
        base: open.base.replace("0.0.0.0", "127.0.0.1"),
        ..open
    };
    assert_eq!(open.call("GET", "/all", "", None).0, 200);
    let Served { mut child, .. } = open;
    terminate(&mut child);
    let tokens = dir.path().join("tokens.json");
    std::fs::write(&tokens, r#"{"tokens":[{"name":"short","token":"abc"}]}"#).unwrap();
    let out = run(db, &["serve", "--tokens", tokens.to_str().unwrap()]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("shorter"), "{}", stderr(&out));
    let (writer, ops) = ("orders-writer-0123456789", "operations-0123456789");
    std::fs::write(
        &tokens,
        format!(
            r#"{{"tokens":[
                {{"name":"app","token":"{writer}","read":["Order","Customer"],"write":["Order","Customer"]}},
                {{"name":"ops","token":"{ops}","read":["*"],"admin":["*"]}}]}}"#
        ),
    )
    .unwrap();

    assert_eq!(
        code(&run(db, &["outbox", "publish", "--category", "Order"])),
        0
    );
    assert_eq!(
        code(&run(db, &["demo", "--orders", "5", "--sink", "none"])),
        0
    );
    let relayed = dir.path().join("relayed.jsonl");
    let sink = format!("file://{}", relayed.display());
    let served = Served::start(
        db,
        &[
            "--listen",
            "0.0.0.0:0",
            "--tokens",
            tokens.to_str().unwrap(),
            "--projections",
            "--relay",
            &sink,
            "--log-format",
            "json",
            "--log",
            "info,tower_http=debug",
        ],
    );
    assert!(
        served.base.starts_with("http://0.0.0.0:"),
        "{}",
        served.base
    );
    let base = served.base.replace("0.0.0.0", "127.0.0.1");
    let served = Served { base, ..served };

    // Appends through the API reach the read models and the outbox.
    let (status, _) = served.call(
        "POST",
        "/streams/Order-http-1",
        "",
        Some(r#"{"type":"OrderPlaced"}"#),
    );
    assert_eq!(status, 401);
    let placed = r#"{"type":"OrderPlaced","metadata":{"schema_version":2},"data":{"customer_id":"c-http","region":"eu-west","lines":[{"sku":"SKU-MOUSE","quantity":1,"unit_price_cents":3900}],"total_cents":3900,"currency":"EUR"}}"#;
    let (status, appended) = served.call_with(
        "POST",
        "/streams/Order-http-1",
        writer,
        Some(placed),
        &[("Correlation-Id", "corr-http-1")],
    );
    assert_eq!(status, 201, "{appended}");
    // The request's log lines are JSON and carry its correlation id; no
    // line shows a token.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = served.log.lock().unwrap().clone();
        let tagged = log
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| {
                l["span"]["correlation_id"] == "corr-http-1"
                    && l["span"]["path"] == "/streams/Order-http-1"
            });
        assert!(
            !log.iter().any(|l| l.contains(writer) || l.contains(ops)),
            "a token was logged"
        );
        if tagged {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line carries the correlation id: {log:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, stored) = served.call("GET", "/streams/Order-http-1", writer, None);
    assert_eq!(
        stored["events"][0]["metadata"]["correlation_id"],
        "corr-http-1"
    );
    let head = appended["last_position"].as_u64().unwrap();
    let list = served.until("/admin/projections", ops, |l| {
        l["projections"].as_array().is_some_and(|ps| {
            ps.len() == 3 && ps.iter().all(|p| p["checkpoint"].as_u64() >= Some(head))
        })
    });
    for name in ["order_list", "revenue", "customer_totals"] {
        let p = projection(&list, name);
        assert_eq!(
            (&p["state"], &p["lag_events"]),
            (&json!("running"), &json!(0)),
            "{p}"
        );
    }
    let (status, _) = served.call("GET", "/admin/projections", writer, None);
    assert_eq!(status, 403);

    // Pause holds a projection back; resume lets it catch up.
    let (status, paused) = served.call("POST", "/admin/projections/order_list/pause", ops, None);
    assert_eq!(
        (status, &paused["state"]),
        (200, &json!("paused")),
        "{paused}"
    );
    let (_, more) = served.call("POST", "/streams/Order-http-2", writer, Some(placed));
    let head = more["last_position"].as_u64().unwrap();
    served.until("/admin/projections/customer_totals", ops, |p| {
        p["checkpoint"].as_u64() >= Some(head)
    });
    let (_, held) = served.call("GET", "/admin/projections/order_list", ops, None);
    assert!(held["lag_events"].as_u64() > Some(0), "{held}");
    let (status, _) = served.call("POST", "/admin/projections/order_list/resume", ops, None);
    assert_eq!(status, 200);
    served.until("/admin/projections/order_list", ops, |p| {
        p["state"] == "running" && p["lag_events"] == 0
    });

    // A rebuild runs in the background; its progress and swap show.
    let (status, started) = served.call("POST", "/admin/projections/revenue/rebuild", ops, None);
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["rebuild"]["version"], 2);
    let rebuilt = served.until("/admin/projections/revenue", ops, |p| {
        p["rebuild"]["state"] == "swapped" && p["active_version"] == 2
    });
    assert_eq!(
        rebuilt["rebuild"]["done"], rebuilt["rebuild"]["total"],
        "{rebuilt}"
    );
    served.until("/admin/projections/revenue", ops, |p| {
        p["lag_events"] == 0 && p["state"] == "running"
    });
    let (status, refused) = served.call("POST", "/admin/projections/nope/rebuild", ops, None);
    assert_eq!(status, 404, "{refused}");

    // A poison event is parked; retry leaves it, skip gives up on it.
    let (_, bad) = served.call(
        "POST",
        "/streams/Order-bad",
        writer,
        Some(r#"{"type":"OrderPlaced","data":{"oops":true}}"#),
    );
    let bad = bad["first_position"].as_u64().unwrap();
    let parked = served.until("/admin/projections/order_list/parked", ops, |p| {
        p["parked"].as_array().is_some_and(|a| !a.is_empty())
    });
    assert_eq!(parked["parked"][0]["position"].as_u64(), Some(bad));
    let (status, retried) = served.call(
        "POST",
        "/admin/projections/order_list/parked/retry",
        ops,
        None,
    );
    assert_eq!(
        (status, &retried["still_parked"]),
        (200, &json!(1)),
        "{retried}"
    );
    let (status, _) = served.call(
        "POST",
        &format!("/admin/projections/order_list/parked/{}/skip", bad + 1000),
        ops,
        None,
    );
    assert_eq!(status, 404);
    let (status, _) = served.call(
        "POST",
        &format!("/admin/projections/order_list/parked/{bad}/skip"),
        ops,
        None,
    );
    assert_eq!(status, 200);
    let (_, p) = served.call("GET", "/admin/projections/order_list", ops, None);
    assert_eq!((&p["parked"], &p["skipped"]), (&json!(0), &json!(1)), "{p}");

    // The relay inside the server published the Order events.
    let outbox = served.until("/admin/outbox", ops, |o| o["backlog"] == 0);
    assert_eq!(
        outbox["relays"].as_array().map(Vec::len),
        Some(1),
        "{outbox}"
    );
    let lines = std::fs::read_to_string(&relayed).unwrap();
    for stream in ["Order-http-1", "Order-http-2", "Order-bad"] {
        assert!(lines.contains(stream), "{stream} was relayed");
    }
    assert!(
        !lines.contains("\"Customer-"),
        "only Order events are published"
    );

    // Metrics carry the projections' lag and the outbox backlog.
    let (status, metrics) = served.call("GET", "/metrics", ops, None);
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains(r#"factline_projection_lag_events{projection="order_list"} 0"#),
        "{text}"
    );
    assert!(text.contains("factline_outbox_backlog 0"), "{text}");

    let Served { mut child, .. } = served;
    terminate(&mut child);
}

fn the_demo_runs_until_interrupted_and_continues_from_its_data(db: Db) {
    let db = &db.spec;
    let demo = factline(db)
        .args(["demo", "--rate", "50", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It serves while it runs: wait for some orders, then interrupt it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while count_all(db) < 100 {
        assert!(std::time::Instant::now() < deadline, "the demo appends");
        std::thread::sleep(Duration::from_millis(100));
    }
    let int = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(int.success());
    let out = demo.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "Ctrl-C stops it cleanly: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Dashboard: http://127.0.0.1:"), "{text}");
    assert!(text.contains("Orders by status"), "{text}");
    let first_run = count_all(db);
    let orders_of = |db: &str| {
        json_lines(&run(db, &["read-category", "Order"]))
            .iter()
            .filter(|e| e["event_type"] == "OrderPlaced")
            .count()
    };
    let placed = orders_of(db);
    // Nothing is left behind: every read model has every event.
    for name in ["order_list", "revenue", "customer_totals"] {
        let p = listed(db, name);
        assert_eq!(p["checkpoint"].as_u64(), Some(first_run as u64), "{p}");
    }
    // Again: it adds to what is stored, and the read models go on from
    // their checkpoints.
    let out = run(db, &["demo", "--orders", "4", "--listen", "127.0.0.1:0"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(orders_of(db), placed + 4);
    let text = String::from_utf8_lossy(&out.stdout);
    let by_status: usize = text
        .split("Orders by status (all runs):")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .map(|block| {
            block
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(by_status, placed + 4, "{text}");
}

/// 64 HTTP clients append for 30 s while 8 subscribers follow `$all`
/// (`factline bench http`, which fails unless every acknowledged event is
/// stored, every subscriber saw every event once in order, and no request
/// got a 5xx).
#[test]
fn the_server_holds_up_under_load() {
    let out = factline("memory:")
        .args(["bench", "http", "--backend", "sqlite", "--clients", "64"])
        .args([
            "--subscribers",
            "8",
            "--seconds",
            "30",
            "--max-requests",
            "200000",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["server_errors"], 0, "{report}");
    assert_eq!(report["subscribers_complete"], true, "{report}");
    assert!(report["requests"].as_u64() > Some(0), "{report}");
    assert_eq!(report["events"], report["requests"], "{report}");
    eprintln!("{report}");
}

/// `factline bench outbox` on a small load: the last line is its JSON
/// report, every relayed and every live event was counted, and the ratio is
/// the median of the rounds' paired ratios.
#[test]
fn the_outbox_bench_reports_paired_ratios_and_latency() {
    let out = factline("memory:")
        .args(["bench", "outbox", "--backend", "sqlite", "--events", "3000"])
        .args(["--rounds", "3", "--rate", "500", "--seconds", "2"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["bench"], "outbox", "{report}");
    assert_eq!(report["events"], 3000, "{report}");
    assert_eq!(report["samples"], 1000, "{report}");
    let mut ratios: Vec<f64> = report["round_ratios"]
        .as_array()
        .expect("round_ratios is an array")
        .iter()
        .map(|r| r.as_f64().expect("a ratio is a number"))
        .collect();
    assert_eq!(ratios.len(), 3, "{report}");
    assert!(ratios.iter().all(|&r| r > 0.0), "{report}");
    ratios.sort_by(f64::total_cmp);
    assert_eq!(report["ratio"].as_f64(), Some(ratios[1]), "{report}");
    let (p50, p99) = (report["p50_ms"].as_f64(), report["p99_ms"].as_f64());
    assert!(p50 > Some(0.0) && p50 <= p99, "{report}");
    assert!(report["events_per_s"].as_f64() > Some(0.0), "{report}");
    assert!(
        report["baseline_events_per_s"].as_f64() > Some(0.0),
        "{report}"
    );
}
