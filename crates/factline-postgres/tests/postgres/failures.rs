//! Failures of the server and the network, for real: a PostgreSQL cluster
//! crashed and restarted under load, and a connection cut right after the
//! server committed, before the client heard so.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::sid;
use factline_core::{
    AppendResult, Appended, CommandKey, EventData, EventStore, ExpectedVersion, RecordedEvent,
    StoreError, StreamFilter,
};
use factline_postgres::PostgresStore;
use factline_testkit::pg::{Durability, PgCluster, StopMode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const EVENTS_PER_APPEND: u64 = 3;

/// One logical append, retried with the same event ids until acknowledged.
fn append_of(writer: u64, k: u64) -> Vec<EventData> {
    (0..EVENTS_PER_APPEND)
        .map(|i| EventData::new("Loaded", json!({ "tag": format!("{writer}-{k}"), "i": i })))
        .collect()
}

fn tag(e: &RecordedEvent) -> String {
    e.data.to_value().unwrap()["tag"]
        .as_str()
        .unwrap()
        .to_string()
}

struct WriterLog {
    acked: Vec<(String, Vec<uuid::Uuid>, AppendResult)>,
    /// How long each failed attempt took to fail.
    failures: Vec<Duration>,
    acked_after_restart: usize,
}

/// Crash the server (immediate stop: no checkpoint, recovery on start)
/// while six writers append and a subscriber and a reader follow `$all`.
/// While it is down appends fail fast with a retryable error; once it is
/// back they succeed again. Every acknowledged append is stored exactly
/// where it was reported, retried appends are stored once, no append is
/// ever visible in part, and the subscriber resumes with no gap or
/// duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_crash_and_restart_under_load() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| PgCluster::start(Durability::Durable))
            .await
            .unwrap(),
    );
    let db = factline_testkit::pg::create_database(&cluster.url("postgres")).await;
    let store = PostgresStore::connect(&db.url).await.unwrap();
    let follower = PostgresStore::connect(&db.url).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));

    let mut sub = follower.subscribe(StreamFilter::All, 1);
    let seen = Arc::new(Mutex::new(Vec::<RecordedEvent>::new()));
    let following = tokio::spawn({
        let seen = seen.clone();
        async move {
            loop {
                let event = sub
                    .next()
                    .await
                    .expect("the subscription never fails for good");
                seen.lock().unwrap().push(event);
            }
        }
    });

    // A reader that reads everything after what it has seen, repeatedly,
    // and checks that every append it sees starting is complete.
    let reader = tokio::spawn({
        let (store, stop) = (follower.clone(), stop.clone());
        async move {
            let (mut from, mut reads) = (1, 0u64);
            while !stop.load(Ordering::SeqCst) {
                let Ok(page) = store.read_all(from, usize::MAX).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                reads += 1;
                let mut counts: HashMap<String, u64> = HashMap::new();
                for e in &page {
                    *counts.entry(tag(e)).or_default() += 1;
                }
                for e in page.iter().filter(|e| e.data.to_value().unwrap()["i"] == 0) {
                    assert_eq!(
                        counts[&tag(e)],
                        EVENTS_PER_APPEND,
                        "append {} seen in part",
                        tag(e)
                    );
                }
                if let Some(last) = page.last() {
                    from = last.position + 1;
                }
            }
            reads
        }
    });

    let writers: Vec<_> = (0..6u64)
        .map(|w| {
            let (store, stop, restarted) = (store.clone(), stop.clone(), restarted.clone());
            tokio::spawn(async move {
                let mut log = WriterLog {
                    acked: Vec::new(),
                    failures: Vec::new(),
                    acked_after_restart: 0,
                };
                let mut k = 0;
                while !stop.load(Ordering::SeqCst) {
                    let events = append_of(w, k);
                    let ids: Vec<_> = events.iter().map(|e| e.event_id).collect();
                    let stream = sid(&format!("Load-{w}-{}", k % 5));
                    loop {
                        let started = Instant::now();
                        match store
                            .append(&stream, ExpectedVersion::Any, events.clone())
                            .await
                        {
                            Ok(result) => {
                                if restarted.load(Ordering::SeqCst) {
                                    log.acked_after_restart += 1;
                                }
                                log.acked.push((format!("{w}-{k}"), ids, result));
                                break;
                            }
                            Err(StoreError::Storage(e)) if e.is_retryable() => {
                                log.failures.push(started.elapsed());
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(e) => panic!("append failed for good: {e}"),
                        }
                    }
                    k += 1;
                }
                log
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop(StopMode::Immediate))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart())
        .await
        .unwrap();
    restarted.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);

    let mut logs = Vec::new();
    for writer in writers {
        logs.push(writer.await.unwrap());
    }
    assert!(reader.await.unwrap() > 0);
    let failures: Vec<Duration> = logs
        .iter()
        .flat_map(|l| l.failures.iter().copied())
        .collect();
    assert!(
        !failures.is_empty(),
        "no append failed while the server was down"
    );
    // Fail fast: an append against a dead server returns an error rather
    // than hanging (the bound is generous; it catches a hang, not a speed).
    let slowest = failures.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_secs(10),
        "an append took {slowest:?} to fail"
    );
    assert!(
        logs.iter().all(|l| l.acked_after_restart > 0),
        "appends did not recover"
    );

    let all = store.read_all(1, usize::MAX).await.unwrap();
    let by_id: HashMap<uuid::Uuid, &RecordedEvent> = all.iter().map(|e| (e.event_id, e)).collect();
    let mut acked_tags = HashSet::new();
    for (tag, ids, result) in logs.iter().flat_map(|l| &l.acked) {
        acked_tags.insert(tag.clone());
        for (i, id) in ids.iter().enumerate() {
            let stored = by_id
                .get(id)
                .unwrap_or_else(|| panic!("acknowledged append {tag} lost"));
            assert_eq!(
                stored.position,
                result.first_position + i as u64,
                "append {tag} moved"
            );
            assert_eq!(stored.version, result.first_version + i as u64);
        }
    }
    // Nothing is stored twice or in part, and nothing unacknowledged is
    // stored (every attempt was retried until acknowledged).
    let mut counts: HashMap<String, u64> = HashMap::new();
    for e in &all {
        *counts.entry(tag(e)).or_default() += 1;
    }
    assert!(
        counts.values().all(|&n| n == EVENTS_PER_APPEND),
        "an append is stored in part or twice"
    );
    assert_eq!(counts.len(), acked_tags.len());
    assert!(all.iter().zip(1..).all(|(e, p)| e.position == p));

    // The subscriber caught up across the crash.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < all.len() {
        assert!(Instant::now() < deadline, "the subscriber did not resume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    following.abort();
    let seen = seen.lock().unwrap();
    let key = |e: &RecordedEvent| (e.position, e.event_id);
    assert!(
        seen.iter().map(key).eq(all.iter().map(key)),
        "the subscriber's sequence differs from $all"
    );
}

/// A TCP proxy in front of PostgreSQL that, when armed, cuts the writer's
/// connection at the server's acknowledgement of a commit instead of passing
/// it on: the transaction is committed, and the client never hears so.
struct AckCutter {
    port: u16,
    armed: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
}

/// The CommandComplete message the server sends for COMMIT (a batch written
/// in an explicit transaction).
const COMMIT_COMPLETE: &[u8] = b"C\x00\x00\x00\x0bCOMMIT\x00";
/// CommandComplete for a one-row SELECT, then ReadyForQuery outside a
/// transaction: a batch written in one statement, committed at its Sync.
const ONE_STATEMENT_COMMITTED: &[u8] = b"C\x00\x00\x00\x0dSELECT 1\x00Z\x00\x00\x00\x05I";
/// The writer connection names itself in its startup message.
const WRITER_NAME: &[u8] = b"factline writer";

impl AckCutter {
    async fn start(server_port: u16) -> AckCutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let (a, c) = (armed.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(("127.0.0.1", server_port))
                    .await
                    .unwrap();
                tokio::spawn(pump(client, server, a.clone(), c.clone()));
            }
        });
        AckCutter { port, armed, cut }
    }

    fn arm(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn pump(client: TcpStream, server: TcpStream, armed: Arc<AtomicBool>, cut: Arc<AtomicBool>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // The startup message is the client's first; it says whether this is
    // the writer's connection.
    let mut startup = vec![0u8; 8 * 1024];
    let n = match client_read.read(&mut startup).await {
        Ok(n) if n > 0 => n,
        _ => return,
    };
    let is_writer = contains(&startup[..n], WRITER_NAME);
    if server_write.write_all(&startup[..n]).await.is_err() {
        return;
    }
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let is_commit_ack = is_writer
            && (contains(chunk, COMMIT_COMPLETE) || contains(chunk, ONE_STATEMENT_COMMITTED));
        if is_commit_ack && armed.swap(false, Ordering::SeqCst) {
            cut.store(true, Ordering::SeqCst);
            break;
        }
        if client_write.write_all(chunk).await.is_err() {
            break;
        }
    }
    // Dropping both halves closes the connection both ways.
    upstream.abort();
}

/// S3 across a lost acknowledgement: the server commits, the connection is
/// cut before the answer arrives, the append reports a retryable failure,
/// and retrying it with the same event ids returns the original result and
/// writes nothing more. Small appends are committed in one statement, large
/// ones in an explicit transaction: both are cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn append_whose_acknowledgement_was_lost_is_safe_to_retry() {
    let cluster = tokio::task::spawn_blocking(|| PgCluster::start(Durability::Throwaway))
        .await
        .unwrap();
    let db = factline_testkit::pg::create_database(&cluster.url("postgres")).await;
    let cutter = AckCutter::start(cluster.port()).await;
    let proxied = factline_testkit::pg::with_database(
        &format!("postgres://postgres@127.0.0.1:{}/x", cutter.port),
        db.name(),
    );
    let store = PostgresStore::connect(&proxied).await.unwrap();
    let direct = PostgresStore::connect(&db.url).await.unwrap();

    let mut stored_before = 0u64;
    for (round, (expected, size)) in [
        (ExpectedVersion::NoStream, 2),
        (ExpectedVersion::Exact(2), 2),
        (ExpectedVersion::Any, 2),
        (ExpectedVersion::Exact(6), 300),
        (ExpectedVersion::Any, 300),
    ]
    .into_iter()
    .enumerate()
    {
        let events: Vec<EventData> = (0..size)
            .map(|i| EventData::new("Placed", json!({ "round": round, "i": i })))
            .collect();
        cutter.arm();
        match store
            .append(&sid("Order-1"), expected, events.clone())
            .await
        {
            Err(StoreError::Storage(e)) => {
                assert!(e.is_retryable(), "{e}");
                assert!(e.message().contains("may or may not"), "{e}");
            }
            other => panic!("round {round}: expected a lost acknowledgement, got {other:?}"),
        }
        assert!(
            cutter.cut.load(Ordering::SeqCst),
            "round {round}: the proxy did not cut a commit"
        );
        // The server did commit.
        let stored = direct.read_all(1, usize::MAX).await.unwrap();
        assert_eq!(stored.len() as u64, stored_before + size);
        let first = stored_before + 1;
        assert_eq!(stored[stored_before as usize].event_id, events[0].event_id);

        let retried = store
            .append(&sid("Order-1"), expected, events)
            .await
            .unwrap();
        let last = stored_before + size;
        assert_eq!(
            (
                retried.first_version,
                retried.last_version,
                retried.first_position,
                retried.last_position
            ),
            (first, last, first, last),
            "round {round}"
        );
        assert_eq!(
            direct.read_all(1, usize::MAX).await.unwrap().len() as u64,
            last
        );
        stored_before = last;
    }

    // A command whose acknowledgement was lost, sent again under its key
    // with new event ids (as a client rebuilding it would): the first
    // execution's record comes back and nothing more is written.
    let key = CommandKey::new("pay-order-1", "same command");
    let paid = || vec![EventData::new("Paid", json!({}))];
    let first_try = paid();
    let expected = ExpectedVersion::Exact(stored_before);
    cutter.arm();
    match store
        .append_command(&sid("Order-1"), expected, first_try.clone(), &key)
        .await
    {
        Err(StoreError::Storage(e)) => assert!(e.message().contains("may or may not"), "{e}"),
        other => panic!("expected a lost acknowledgement, got {other:?}"),
    }
    assert!(
        cutter.cut.load(Ordering::SeqCst),
        "the proxy did not cut the command's commit"
    );
    match store
        .append_command(&sid("Order-1"), expected, paid(), &key)
        .await
        .unwrap()
    {
        Appended::Replayed(record) => {
            assert_eq!(record.event_ids, vec![first_try[0].event_id]);
            assert_eq!(record.result.first_version, stored_before + 1);
        }
        Appended::Written(r) => panic!("the command ran twice: {r:?}"),
    }
    assert_eq!(
        direct.read_all(1, usize::MAX).await.unwrap().len() as u64,
        stored_before + 1
    );
}
