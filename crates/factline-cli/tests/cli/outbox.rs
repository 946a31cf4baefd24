//! The outbox through the CLI: publications, status and the relay.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

on_every_backend!(the_outbox_is_configured_and_relayed_through_the_cli,);

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
    assert_eq!(status["parked"], 0, "the file sink refused nothing");
    let parked = run(db, &["outbox", "parked", "--limit", "10"]);
    assert_eq!(code(&parked), 0, "{}", stderr(&parked));
    assert!(json_lines(&parked).is_empty());

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
