//! `factline serve`: the event API, the admin API and the relay in one process, and under load.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

on_every_backend!(the_server_runs_the_api_the_admin_api_and_the_relay,);

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
    assert_eq!(started["rebuild"]["version"], 3);
    let rebuilt = served.until("/admin/projections/revenue", ops, |p| {
        p["rebuild"]["state"] == "swapped" && p["active_version"] == 3
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
