//! S4 under load: 16 concurrent writers, in this process and in two child
//! processes, append 20 000 events while a subscriber in a store of its own
//! follows `$all`. What the subscriber saw must equal the final `$all`
//! exactly: no gap, no duplicate, same order.
//!
//! The test re-runs its own binary as the child processes: with `CHILD_URL`
//! set, the test function becomes a child that runs its writers and exits.

use crate::common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::sid;
use factline_core::{EventData, EventStore, ExpectedVersion, RecordedEvent, StreamFilter};
use factline_postgres::PostgresStore;
use serde_json::json;

const CHILD_URL: &str = "FACTLINE_TEST_STRESS_CHILD_URL";
const CHILD_FIRST_WRITER: &str = "FACTLINE_TEST_STRESS_FIRST_WRITER";
const WRITERS: u64 = 16;
const PARENT_WRITERS: u64 = 8;
const CHILD_WRITERS: u64 = 4;
const TOTAL: u64 = 20_000;
const PER_WRITER: u64 = TOTAL / WRITERS;
const _: () =
    assert!(PARENT_WRITERS + 2 * CHILD_WRITERS == WRITERS && PER_WRITER * WRITERS == TOTAL);

/// Writer `w` appends `PER_WRITER` events in appends of 1 to 5 events: to
/// its own streams with exact expected versions, and every fourth append to
/// a stream all writers share.
async fn write(store: PostgresStore, w: u64) {
    let mut versions: HashMap<u64, u64> = HashMap::new();
    let (mut sent, mut k) = (0, 0u64);
    while sent < PER_WRITER {
        let n = (k % 5 + 1).min(PER_WRITER - sent);
        let events: Vec<EventData> = (0..n)
            .map(|i| EventData::new("Stressed", json!({ "w": w, "k": k, "i": i })))
            .collect();
        if k % 4 == 3 {
            let stream = sid(&format!("Shared-{}", k % 3));
            store
                .append(&stream, ExpectedVersion::Any, events)
                .await
                .expect("append to a shared stream");
        } else {
            let own = k % 7;
            let version = versions.entry(own).or_insert(0);
            let stream = sid(&format!("Own-w{w}s{own}"));
            let result = store
                .append(&stream, ExpectedVersion::Exact(*version), events)
                .await
                .expect("append to an own stream");
            *version = result.last_version;
        }
        sent += n;
        k += 1;
    }
}

fn run_child(url: &str) -> ! {
    let first: u64 = std::env::var(CHILD_FIRST_WRITER)
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("first writer number");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = PostgresStore::connect(url).await.expect("child connects");
        let writers: Vec<_> = (first..first + CHILD_WRITERS)
            .map(|w| tokio::spawn(write(store.clone(), w)))
            .collect();
        for writer in writers {
            writer.await.expect("child writer");
        }
    });
    std::process::exit(0)
}

#[test]
fn sixteen_writers_in_three_processes_and_a_subscriber_agree_on_all() {
    if let Ok(url) = std::env::var(CHILD_URL) {
        run_child(&url);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let db = factline_testkit::pg::database().await;
        let store = PostgresStore::connect(&db.url).await.unwrap();
        // The subscriber's store writes nothing: every wake-up it gets comes
        // through LISTEN/NOTIFY, from this process's writer or the children's.
        let follower = PostgresStore::connect(&db.url).await.unwrap();
        let mut sub = follower.subscribe(StreamFilter::All, 1);
        let following = tokio::spawn(async move {
            let mut seen: Vec<RecordedEvent> = Vec::with_capacity(TOTAL as usize);
            while seen.len() < TOTAL as usize {
                match tokio::time::timeout(Duration::from_secs(120), sub.next()).await {
                    Ok(Ok(event)) => seen.push(event),
                    Ok(Err(e)) => panic!("subscription failed after {}: {e}", seen.len()),
                    Err(_) => panic!("subscription stalled after {} events", seen.len()),
                }
            }
            (sub, seen)
        });

        let children: Vec<_> = [PARENT_WRITERS, PARENT_WRITERS + CHILD_WRITERS]
            .into_iter()
            .map(|first| {
                let test = factline_testkit::process::test_name(
                    module_path!(),
                    "sixteen_writers_in_three_processes_and_a_subscriber_agree_on_all",
                );
                Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", &test, "--nocapture"])
                    .env(CHILD_URL, &db.url)
                    .env(CHILD_FIRST_WRITER, first.to_string())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("start a child writer process")
            })
            .collect();
        let writers: Vec<_> = (0..PARENT_WRITERS)
            .map(|w| tokio::spawn(write(store.clone(), w)))
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        for mut child in children {
            let status = tokio::task::spawn_blocking(move || child.wait())
                .await
                .unwrap()
                .unwrap();
            assert!(status.success(), "a child writer process failed: {status}");
        }

        let (mut sub, seen) = following.await.unwrap();
        let all = store.read_all(1, usize::MAX).await.unwrap();
        assert_eq!(all.len(), TOTAL as usize);
        let key = |e: &RecordedEvent| (e.position, e.event_id);
        let seen_keys: Vec<_> = seen.iter().map(key).collect();
        let all_keys: Vec<_> = all.iter().map(key).collect();
        assert!(
            seen_keys == all_keys,
            "the subscriber's sequence differs from $all"
        );
        // Positions are handed out under the head lock, so they are dense.
        assert!(all.iter().zip(1..).all(|(e, p)| e.position == p));
        // Every stream's versions run 1, 2, 3, … in position order.
        let mut versions: HashMap<&str, u64> = HashMap::new();
        for e in &all {
            let last = versions.entry(e.stream_id.as_str()).or_insert(0);
            assert_eq!(e.version, *last + 1, "stream {}", e.stream_id);
            *last = e.version;
        }
        // Every writer's events are all there.
        let mut per_writer: HashMap<u64, u64> = HashMap::new();
        for e in &all {
            *per_writer
                .entry(e.data.to_value().unwrap()["w"].as_u64().unwrap())
                .or_insert(0) += 1;
        }
        assert_eq!(per_writer.len(), WRITERS as usize);
        assert!(per_writer.values().all(|&n| n == PER_WRITER));
        // And nothing more arrives.
        let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        assert!(extra.is_err(), "unexpected extra event {extra:?}");
    });
}
