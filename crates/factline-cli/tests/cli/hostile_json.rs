//! One bad event must never break a reader. Hostile JSON (deep nesting,
//! numbers at and past the float range, every escape, lone surrogates) is
//! sent to a real server; whatever it accepts, every reader returns: an
//! HTTP page, a Server-Sent Events subscription, `factline read-all`, an
//! in-process subscription, the read models' runner and the outbox relay.
//! Events that an earlier version stored and no strict parser reads are
//! returned as stored, and parked by the read models.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use factline_core::{EventStore, StreamFilter, Subscription};
use futures_util::StreamExt;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::common::*;

/// The parts of an event every reader returns, with the data kept as the
/// text it came in (so an event no strict parser reads still shows).
#[derive(Deserialize)]
struct Seen {
    stream_id: String,
    position: u64,
    data: Box<RawValue>,
    metadata: Value,
}

/// A line of the relay's file sink.
#[derive(Deserialize)]
struct Relayed {
    event: Seen,
}

#[derive(Deserialize)]
struct Page {
    events: Vec<Seen>,
}

/// Number texts at and past the edges of what a 64-bit float holds.
const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "0e0",
    "1E+2",
    "-1.5e-7",
    "1e400",
    "-1e400",
    "1e-400",
    "1.7976931348623157e308",
    "1.8e308",
    "4.9e-324",
    "2.2250738585072014e-308",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "123456789012345678901234567890",
    "0.000000000000000000000000000001",
];

/// String contents: escapes of every kind, paired and lone surrogates,
/// raw multi-byte characters.
const PIECES: &[&str] = &[
    "a",
    "plain text",
    r"\ud800",
    r"\udc00",
    r"\udbff\udfff",
    r"\ud83d\ude00",
    r"\ude00\ud83d",
    r"\u0000",
    r"\u001f",
    r"\uFFFF",
    r"\n\r\t\b\f",
    r#"\"\\\/"#,
    "é",
    "😀",
    "\u{7f}",
];

fn json_string() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(PIECES), 0..4)
        .prop_map(|p| format!("\"{}\"", p.concat()))
}

fn leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(NUMBERS).prop_map(str::to_owned),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        json_string(),
        Just("true".to_owned()),
        Just("null".to_owned()),
    ]
}

/// A JSON text: small trees of hostile leaves, sometimes wrapped in
/// arrays or objects nested 120 to 140 levels deep.
fn hostile_json() -> impl Strategy<Value = String> {
    let tree = leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((json_string(), inner), 0..4).prop_map(|fields| {
                let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    });
    (
        tree,
        prop::option::weighted(0.3, (120usize..140, any::<bool>())),
    )
        .prop_map(|(tree, deep)| match deep {
            None => tree,
            Some((depth, true)) => format!("{}{tree}{}", "[".repeat(depth), "]".repeat(depth)),
            Some((depth, false)) => {
                format!("{}{tree}{}", r#"{"k":"#.repeat(depth), "}".repeat(depth))
            }
        })
}

/// An append body putting `text` where hostile input can go: the data, a
/// header value, the correlation id.
fn body(text: &str, place: usize) -> String {
    match place % 4 {
        0 | 1 => format!(r#"{{"type":"Hostile","data":{text}}}"#),
        2 => format!(r#"{{"type":"Hostile","metadata":{{"headers":{{"h":{text}}}}}}}"#),
        _ => format!(r#"{{"type":"Hostile","metadata":{{"correlation_id":{text}}}}}"#),
    }
}

on_every_backend!(whatever_an_append_accepts_every_reader_returns);

fn whatever_an_append_accepts_every_reader_returns(db: Db) {
    let db = &db.spec;
    let dir = tempfile::tempdir().unwrap();
    // Publish every category, so the relay carries the hostile events too.
    for category in ["Hostile", "Legacy", "Order"] {
        let out = run(db, &["outbox", "publish", "--category", category]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    // Events an earlier version accepted and no strict parser reads.
    let legacy = store_unreadable_events(db);

    let relayed = dir.path().join("relayed.jsonl");
    let sink = format!("file://{}", relayed.display());
    let served = Served::start(
        db,
        &["--listen", "127.0.0.1:0", "--projections", "--relay", &sink],
    );

    // A fresh seed each run; a failing case prints its text.
    let mut runner = TestRunner::new(Config::default());
    let strategy = hostile_json();
    let mut accepted: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut refused = 0;
    for case in 0..400 {
        let text = strategy.new_tree(&mut runner).unwrap().current();
        let stream = format!("Hostile-{case}");
        let body = body(&text, case);
        let (status, answer) = served.call_with(
            "POST",
            &format!("/streams/{stream}"),
            "",
            Some(&body),
            &[("content-type", "application/json")],
        );
        match status {
            201 => {
                accepted.insert(stream, (text, case));
            }
            400 => {
                assert_eq!(answer["error"], "invalid_request", "{answer}");
                refused += 1;
            }
            other => panic!("{body:.200} answered {other}: {answer}"),
        }
    }
    assert!(
        accepted.len() > 50 && refused > 50,
        "the cases cover both sides: {} accepted, {refused} refused",
        accepted.len()
    );
    let total = legacy.len() + accepted.len();

    // What a reader returned is what was sent, and nothing is missing.
    let check = |reader: &str, seen: &[Seen]| {
        assert_eq!(seen.len(), total, "{reader} returned every event");
        for event in seen {
            if let Some(text) = legacy.get(&event.position) {
                assert_eq!(event.data.get(), text, "{reader}: a stored text as it is");
                continue;
            }
            let (text, place) = &accepted[&event.stream_id];
            let sent: Value = serde_json::from_str(text).unwrap_or_else(|e| {
                panic!("{reader}: accepted {text:.200} which does not parse: {e}")
            });
            let got = match place % 4 {
                0 | 1 => serde_json::from_str(event.data.get()).unwrap(),
                2 => event.metadata["headers"]["h"].clone(),
                _ => event.metadata["correlation_id"].clone(),
            };
            assert_eq!(got, sent, "{reader}: {} as sent", event.stream_id);
        }
    };

    // HTTP pages.
    let mut paged = Vec::new();
    loop {
        let from = paged.last().map_or(1, |e: &Seen| e.position + 1);
        let text = served.text(&format!("/all?from={from}&limit=100"));
        let page: Page = serde_json::from_str(&text).expect("a page of events");
        if page.events.is_empty() {
            break;
        }
        paged.extend(page.events);
    }
    check("GET /all", &paged);

    // A subscription over Server-Sent Events.
    let streamed = served.runtime.block_on(async {
        let response = served
            .client
            .get(format!("{}/subscribe/all", served.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let mut parser = factline_server::sse::SseParser::default();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.len() < total {
            let chunk = tokio::time::timeout_at(deadline.into(), body.next())
                .await
                .expect("the subscription delivers every event within 60 s")
                .expect("the subscription stays open")
                .unwrap();
            parser.push(&chunk);
            while let Some(message) = parser.next_message() {
                assert_eq!(message.event, None, "{}", message.data);
                seen.push(serde_json::from_str::<Seen>(&message.data).unwrap());
            }
        }
        seen
    });
    check("GET /subscribe/all", &streamed);

    // The CLI.
    let out = run(db, &["read-all"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let printed: Vec<Seen> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    check("factline read-all", &printed);

    // A subscription in this process.
    let subscribed = served.runtime.block_on(async {
        let store = open_store(db).await;
        let mut subscription = Subscription::new(store, StreamFilter::All, 1, None);
        let mut seen = Vec::new();
        while seen.len() < total {
            let event = subscription.next().await.unwrap();
            seen.push(
                serde_json::from_str::<Seen>(&serde_json::to_string(&event).unwrap()).unwrap(),
            );
        }
        seen
    });
    check("Subscription", &subscribed);

    // The relay carried every event.
    let deadline = Instant::now() + Duration::from_secs(60);
    let published = loop {
        let text = std::fs::read_to_string(&relayed).unwrap_or_default();
        // At least once: a position may come twice.
        let mut lines: BTreeMap<u64, Seen> = BTreeMap::new();
        for line in text.lines() {
            let Relayed { event } = serde_json::from_str(line).unwrap();
            lines.insert(event.position, event);
        }
        if lines.len() >= total || Instant::now() > deadline {
            break lines.into_values().collect::<Vec<_>>();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    check("the relay", &published);

    // The read models parked the unreadable order and followed to the head.
    let head = paged.last().unwrap().position;
    let order = legacy_order_position(&legacy);
    let list = served.until("/admin/projections", "", |l| {
        l["projections"].as_array().is_some_and(|ps| {
            !ps.is_empty()
                && ps
                    .iter()
                    .all(|p| p["checkpoint"].as_u64() == Some(head) && p["status"] != "failed")
        })
    });
    let (_, parked) = served.call("GET", "/admin/projections/order_list/parked", "", None);
    let parked = parked["parked"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        parked
            .iter()
            .map(|p| p["position"].as_u64())
            .collect::<Vec<_>>(),
        vec![Some(order)],
        "{list}"
    );
    let Served { mut child, .. } = served;
    terminate(&mut child);
}

/// Appends readable events, then rewrites some of their data in the
/// database as an earlier version could have stored it. Returns position →
/// stored text; the last one is an order.
fn store_unreadable_events(db: &str) -> BTreeMap<u64, String> {
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let events = [
        ("Legacy-1", "Legacy", r#"{"ok":true}"#, None),
        ("Legacy-2", "Legacy", r#"{"n":1}"#, Some("1e400")),
        ("Legacy-2", "Legacy", r#"{"n":2}"#, Some(deep.as_str())),
        (
            "Legacy-3",
            "Legacy",
            r#"{"s":1}"#,
            Some(r#"{"s":"\ud800"}"#),
        ),
        ("Legacy-3", "Legacy", r#"{"ok":true}"#, None),
        (
            "Order-legacy",
            "OrderPlaced",
            r#"{"x":1}"#,
            Some(r#"{"total_cents":1e999}"#),
        ),
    ];
    let mut stored = BTreeMap::new();
    for (stream, event_type, text, rewrite) in events {
        let out = run(
            db,
            &["append", stream, "--type", event_type, "--data", text],
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let position = String::from_utf8(out.stdout)
            .ok()
            .and_then(|o| serde_json::from_str::<Value>(&o).ok())
            .and_then(|o| o["first_position"].as_u64())
            .expect("append prints where the event landed");
        if let Some(rewrite) = rewrite {
            rewrite_data(db, position, rewrite);
        }
        stored.insert(position, rewrite.unwrap_or(text).to_owned());
    }
    stored
}

fn legacy_order_position(legacy: &BTreeMap<u64, String>) -> u64 {
    *legacy.keys().last().unwrap()
}

fn rewrite_data(db: &str, position: u64, text: &str) {
    if db.starts_with("postgres") {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client = factline_testkit::pg::connect(db).await;
            let changed = client
                .execute(
                    "UPDATE factline.events SET data = $1::text::json WHERE position = $2",
                    &[&text, &(position as i64)],
                )
                .await
                .unwrap();
            assert_eq!(changed, 1);
        });
    } else {
        let conn = rusqlite::Connection::open(db).unwrap();
        let changed = conn
            .execute(
                "UPDATE events SET data = ?1 WHERE position = ?2",
                rusqlite::params![text, position as i64],
            )
            .unwrap();
        assert_eq!(changed, 1);
    }
}

async fn open_store(db: &str) -> Arc<dyn EventStore> {
    if db.starts_with("postgres") {
        Arc::new(factline_postgres::PostgresStore::connect(db).await.unwrap())
    } else {
        Arc::new(factline_sqlite::SqliteStore::open(db).unwrap())
    }
}

#[test]
fn refused_json_is_named_and_writes_nothing() {
    let db = sqlite_db();
    let db = &db.spec;
    for (text, problem) in [
        ("1e400", "number out of range"),
        (r#"{"s":"\ud800"}"#, "surrogate"),
        (
            &format!("{}{}", "[".repeat(128), "]".repeat(128)),
            "recursion limit",
        ),
    ] {
        let out = run(db, &["append", "Hostile-1", "--type", "T", "--data", text]);
        assert_eq!(code(&out), 2, "{text:.40}: {}", stderr(&out));
        assert!(stderr(&out).contains(problem), "{}", stderr(&out));
    }
    let out = run(db, &["read-all"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "nothing was written");
}
