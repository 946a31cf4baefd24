//! The demo run until interrupted, and the benchmarks' own checks.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

on_every_backend!(the_demo_runs_until_interrupted_and_continues_from_its_data,);

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

/// `factline bench dashboard --declared` asks the demo's declared revenue
/// read model over HTTP while orders are written: its query answers rows
/// with money in them, and the report says how fast against live SQL.
#[test]
fn the_dashboard_bench_asks_the_declared_read_model_over_http() {
    let out = factline("memory:")
        .args([
            "bench",
            "dashboard",
            "--backend",
            "sqlite",
            "--events",
            "3000",
        ])
        .args(["--samples", "5", "--rate", "50", "--declared"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["bench"], "dashboard", "{report}");
    assert_eq!(report["declared"], true, "{report}");
    assert_eq!(report["samples"], 5, "{report}");
    assert!(
        report["projection_total_cents"].as_i64() > Some(0),
        "{report}"
    );
    assert!(
        report["live_sql_total_cents"].as_i64() > Some(0),
        "{report}"
    );
    let (p50, p99) = (
        report["projection_p50_ms"].as_f64(),
        report["projection_p99_ms"].as_f64(),
    );
    assert!(p50 > Some(0.0) && p50 <= p99, "{report}");
    assert!(report["ratio"].as_f64() > Some(0.0), "{report}");
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
