//! Projections through the CLI: listed, rebuilt, paused, resumed, parked events, partitions, and the demo's read models.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

on_every_backend!(
    demo_appends_orders_and_reports_them,
    projections_are_listed_rebuilt_paused_and_resumed,
    a_live_read_model_follows_a_rebuild_swapped_in_by_another_process,
    poison_events_are_parked_listed_retried_and_skipped,
    partitions_change_by_a_rebuild_and_live_runners_run_them,
);

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
fn projections_are_listed_rebuilt_paused_and_resumed(db: Db) {
    let db = &db.spec;
    assert_eq!(code(&run(db, &["demo", "--orders", "15"])), 0);
    let head = count_all(db) as u64;
    for name in ["order_list", "revenue", "customer_totals"] {
        let p = listed(db, name);
        assert_eq!(p["active_version"], 2, "{p}");
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
        (&json!(2), &json!(3)),
        "{diff}"
    );
    assert_nothing_differs(diff);
    let report = &lines[1];
    assert_eq!(
        (&report["version"], &report["swapped"]),
        (&json!(3), &json!(false)),
        "{report}"
    );
    assert_eq!(report["checkpoint"].as_u64(), Some(head));
    let p = listed(db, "revenue");
    assert_eq!(
        (&p["active_version"], &p["state"]),
        (&json!(2), &json!("rebuilding")),
        "{p}"
    );

    // Running it again resumes the stopped rebuild and swaps it in.
    let out = run(db, &["projections", "rebuild", "revenue", "--quiet"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = json_lines(&out).remove(0);
    assert_eq!(
        (&report["version"], &report["previous_version"]),
        (&json!(3), &json!(2)),
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
        (&json!(3), &json!("active")),
        "{p}"
    );
    assert_eq!(
        p["versions"].as_array().unwrap().len(),
        1,
        "version 2 was dropped: {p}"
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
        (&json!(3), &json!(true))
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
        (&json!(3), Some(head)),
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
