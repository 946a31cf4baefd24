//! A writer process killed with SIGKILL in the middle of group commits loses
//! no acknowledged append and leaves no partial one behind; a command's key
//! is stored exactly when its events are.
//!
//! The test re-runs its own test binary as the writer process: with
//! `CHILD_DB` set, the same test function becomes the child.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use factline_core::{
    Appended, CommandKey, EventData, EventStore, ExpectedVersion, ReadStream, StreamId,
};
use factline_sqlite::SqliteStore;
use serde_json::{json, Value};

const CHILD_DB: &str = "FACTLINE_TEST_CRASH_CHILD_DB";
const EVENTS_PER_APPEND: u64 = 20;
const STREAMS: u64 = 40;

/// The child: 8 concurrent writers append forever, printing each
/// acknowledged append as a JSON line. Even writers append as commands
/// whose idempotency key is the append's tag.
fn run_child(path: &str) -> ! {
    factline_testkit::runtime().block_on(async {
        let store = SqliteStore::open(path).unwrap();
        let (acks, mut acked) = tokio::sync::mpsc::unbounded_channel::<String>();
        for writer in 0..8u64 {
            let store = store.clone();
            let acks = acks.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    let stream =
                        StreamId::new(format!("Crash-{}", (writer + n * 8) % STREAMS)).unwrap();
                    let tag = format!("{}-{writer}-{n}", std::process::id());
                    let events = (0..EVENTS_PER_APPEND)
                        .map(|i| EventData::new("Tick", json!({ "append": tag, "i": i })))
                        .collect();
                    let r = if writer % 2 == 0 {
                        let key = CommandKey::new(tag.clone(), "crash test");
                        match store
                            .append_command(&stream, ExpectedVersion::Any, events, &key)
                            .await
                            .unwrap()
                        {
                            Appended::Written(r) => r,
                            Appended::Replayed(r) => panic!("a fresh key replayed {r:?}"),
                        }
                    } else {
                        store
                            .append(&stream, ExpectedVersion::Any, events)
                            .await
                            .unwrap()
                    };
                    let line = json!({
                        "stream": r.stream_id, "tag": tag,
                        "first_version": r.first_version, "first_position": r.first_position,
                    });
                    acks.send(line.to_string()).unwrap();
                }
            });
        }
        let mut out = std::io::stdout().lock();
        while let Some(line) = acked.recv().await {
            writeln!(out, "{line}").unwrap();
            out.flush().unwrap();
        }
    });
    std::process::exit(0)
}

#[test]
fn sigkill_mid_commit_loses_no_acknowledged_append_and_leaves_no_partial_one() {
    if let Ok(path) = std::env::var(CHILD_DB) {
        run_child(&path);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let mut acked: Vec<Value> = Vec::new();
    for round in 0..3 {
        let mut child = factline_testkit::process::rerun(&factline_testkit::process::test_name(
            module_path!(),
            "sigkill_mid_commit_loses_no_acknowledged_append_and_leaves_no_partial_one",
        ))
        .env(CHILD_DB, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        // Let it get well into its stride, then kill it without warning.
        let mut seen = 0;
        while seen < 200 {
            let ack = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    panic!("round {round}: the child stopped acknowledging after {seen} appends")
                });
            acked.push(ack);
            seen += 1;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(rx.try_iter());
    }

    factline_testkit::runtime().block_on(async {
        let store = SqliteStore::open(&path).unwrap();
        // Every acknowledged append is there, whole, where it was reported.
        for ack in &acked {
            let stream = StreamId::new(ack["stream"].as_str().unwrap()).unwrap();
            let from = ack["first_version"].as_u64().unwrap();
            let events = store
                .read_stream(
                    &stream,
                    ReadStream::forwards()
                        .from_version(from)
                        .limit(EVENTS_PER_APPEND as usize),
                )
                .await
                .unwrap();
            assert_eq!(
                events.len() as u64,
                EVENTS_PER_APPEND,
                "acknowledged append {ack} is incomplete"
            );
            assert_eq!(events[0].position, ack["first_position"].as_u64().unwrap());
            assert!(
                events
                    .iter()
                    .all(|e| e.data.to_value().unwrap()["append"] == ack["tag"]),
                "append {ack} was overwritten"
            );
        }
        // Nothing partial: every append in the log is complete and contiguous.
        let all = store.read_all(1, usize::MAX).await.unwrap();
        assert!(all.windows(2).all(|w| w[0].position < w[1].position));
        let mut per_append: HashMap<(String, String), Vec<u64>> = HashMap::new();
        for e in &all {
            let key = (
                e.stream_id.to_string(),
                e.data.to_value().unwrap()["append"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
            per_append.entry(key).or_default().push(e.version);
        }
        for (key, versions) in &per_append {
            assert_eq!(
                versions.len() as u64,
                EVENTS_PER_APPEND,
                "partial append {key:?}"
            );
            assert!(
                versions.windows(2).all(|w| w[1] == w[0] + 1),
                "append {key:?} is not contiguous"
            );
        }
        // A command's key is stored exactly when its events are: for every
        // tag the keyed writers can have used, record and events agree.
        let mut keyed_tags = Vec::new();
        for ack in &acked {
            let tag = ack["tag"].as_str().unwrap();
            let parts: Vec<&str> = tag.split('-').collect();
            let (pid, writer, n): (&str, u64, u64) = (
                parts[0],
                parts[1].parse().unwrap(),
                parts[2].parse().unwrap(),
            );
            if writer % 2 == 0 {
                // Tags a writer may have used past its last acknowledgement.
                for m in 0..=n + 20 {
                    keyed_tags.push(format!("{pid}-{writer}-{m}"));
                }
            }
        }
        keyed_tags.sort();
        keyed_tags.dedup();
        let mut records = 0;
        for tag in &keyed_tags {
            let record = store.find_command(tag).await.unwrap();
            let stored: Vec<_> = all
                .iter()
                .filter(|e| e.data.to_value().unwrap()["append"].as_str() == Some(tag.as_str()))
                .collect();
            match record {
                Some(record) => {
                    records += 1;
                    let ids: Vec<_> = stored.iter().map(|e| e.event_id).collect();
                    assert_eq!(record.event_ids, ids, "the record of {tag} disagrees");
                    assert_eq!(record.result.first_position, stored[0].position);
                }
                None => assert!(stored.is_empty(), "{tag} has events but no key"),
            }
        }
        assert!(records > 0, "no keyed append was checked");
        // And the store keeps working after the crashes.
        store
            .append(
                &StreamId::new("Crash-after").unwrap(),
                ExpectedVersion::NoStream,
                vec![EventData::new("Ok", json!({}))],
            )
            .await
            .unwrap();
    });
}
