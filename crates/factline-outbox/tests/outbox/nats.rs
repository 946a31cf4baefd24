//! The relay against a real `nats-server` with JetStream: ids, headers and
//! duplicates; a broker killed for 10 s during a load; a relay killed
//! with SIGKILL 10 times during a load.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use factline_core::{EventData, EventStore, ExpectedVersion, Metadata, RecordedEvent, StreamId};
use factline_outbox::{
    inbox, Message, NatsSink, NatsSinkConfig, OutboxDb, Publication, Relay, RelayConfig, Sink,
    SqliteOutbox,
};
use factline_testkit::nats::LocalNatsServer;
use futures_util::StreamExt;
use serde_json::json;

fn server() -> LocalNatsServer {
    LocalNatsServer::start().unwrap_or_else(|e| panic!("{e}"))
}

/// A message as a consumer of the JetStream stream sees it.
struct Received {
    msg_id: String,
    event: RecordedEvent,
    headers: BTreeMap<String, String>,
}

/// Reads the `factline` stream from its start until `count` messages
/// arrived (or nothing more comes for a while).
async fn read_stream(url: &str, count: usize) -> Vec<Received> {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    let stream = js.get_stream("factline").await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut received = Vec::with_capacity(count);
    while received.len() < count {
        let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_secs(10), messages.next()).await
        else {
            break;
        };
        let message = message.unwrap();
        let headers: BTreeMap<String, String> = message
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .map(|(name, values)| (name.to_string(), values[0].to_string()))
            .collect();
        received.push(Received {
            msg_id: headers.get("Nats-Msg-Id").cloned().unwrap_or_default(),
            event: serde_json::from_slice(&message.payload).unwrap(),
            headers,
        });
    }
    received
}

/// Each stream's versions in the order the consumer got them must be
/// 1, 2, 3, … with nothing missing or repeated.
fn assert_whole_and_in_order(received: &[Received], expected: &BTreeMap<String, u64>) {
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in received {
        versions
            .entry(r.event.stream_id.to_string())
            .or_default()
            .push(r.event.version);
    }
    assert_eq!(versions.len(), expected.len(), "streams delivered");
    for (stream, last) in expected {
        let got = &versions[stream];
        assert_eq!(got, &(1..=*last).collect::<Vec<_>>(), "stream {stream}");
    }
}

fn open_sqlite(path: &std::path::Path) -> (Arc<dyn EventStore>, Arc<dyn OutboxDb>) {
    let store = factline_sqlite::SqliteStore::open(path).unwrap();
    let db = SqliteOutbox::open(path).unwrap();
    (Arc::new(store), Arc::new(db))
}

fn relay_config(id: &str) -> RelayConfig {
    let mut config = RelayConfig::default();
    config.relay_id = id.into();
    config.fallback_poll = Duration::from_millis(50);
    config.heartbeat = Duration::from_millis(200);
    config.lease_ttl = Duration::from_secs(2);
    config.min_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(500);
    config
}

async fn wait_for_empty_backlog(db: &Arc<dyn OutboxDb>, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let status = db.status().await.unwrap();
        if status.backlog == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backlog did not drain: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_gets_each_event_with_its_id_and_headers_once() {
    let nats = server();
    let dir = tempfile::tempdir().unwrap();
    let (store, db) = open_sqlite(&dir.path().join("f.db"));
    db.add_publication(
        Publication::category("Order").on_subject("factline.{category}.{event_type}"),
    )
    .await
    .unwrap();
    let metadata = Metadata {
        correlation_id: Some("corr-1".into()),
        causation_id: Some("cmd-1".into()),
        ..Metadata::default()
    };
    let stream = StreamId::new("Order-7").unwrap();
    let events: Vec<EventData> = ["Placed", "Paid", "Shipped"]
        .iter()
        .map(|t| EventData::new(*t, json!({ "t": t })).with_metadata(metadata.clone()))
        .collect();
    let ids: Vec<_> = events.iter().map(|e| e.event_id).collect();
    store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap();

    let sink = Arc::new(
        NatsSink::connect(NatsSinkConfig::new(nats.url()))
            .await
            .unwrap(),
    );
    let relay =
        Relay::new(db.clone(), sink.clone(), relay_config("r")).woken_by(store.watch_head());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(relay.run(stopped));
    wait_for_empty_backlog(&db, Duration::from_secs(20)).await;

    let received = read_stream(&nats.url(), 3).await;
    let got: Vec<String> = received.iter().map(|r| r.msg_id.clone()).collect();
    let want: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    assert_eq!(got, want, "the event ids are the message ids, in order");
    let first = &received[0];
    assert_eq!(first.headers["Factline-Event-Type"], "Placed");
    assert_eq!(first.headers["Factline-Stream-Id"], "Order-7");
    assert_eq!(first.headers["Factline-Correlation-Id"], "corr-1");
    assert_eq!(first.headers["Factline-Causation-Id"], "cmd-1");
    assert_eq!(first.event.data.to_value().unwrap()["t"], "Placed");

    // An event appended while the relay runs goes out at once, woken by
    // the append.
    store
        .append(
            &stream,
            ExpectedVersion::Exact(3),
            vec![EventData::new("Closed", json!({}))],
        )
        .await
        .unwrap();
    wait_for_empty_backlog(&db, Duration::from_secs(20)).await;
    stop.send_replace(true);
    running.await.unwrap().unwrap();

    // A re-publish of an event id is dropped by JetStream's window.
    let again: Message = {
        assert_eq!(db.status().await.unwrap().backlog, 0);
        let received = read_stream(&nats.url(), 4).await;
        assert_eq!(received.len(), 4);
        Message {
            position: received[3].event.position,
            event_id: received[3].event.event_id,
            stream_id: "Order-7".into(),
            version: 4,
            event_type: "Closed".into(),
            subject: "factline.Order.Closed".into(),
            key: "Order-7".into(),
            correlation_id: None,
            causation_id: None,
            payload: serde_json::to_vec(&received[3].event).unwrap().into(),
        }
    };
    assert!(sink.publish(std::slice::from_ref(&again)).await[0].is_ok());
    let info = jetstream::new(async_nats::connect(nats.url()).await.unwrap())
        .get_stream("factline")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.state.messages, 4, "the duplicate was not stored");
}

/// Appends `total` events (or until `stop`) over `streams` streams,
/// `per_append` at a time, about `rate` events per second. Returns each
/// stream's last version.
async fn load(
    store: Arc<dyn EventStore>,
    total: u64,
    streams: u64,
    per_append: u64,
    rate: u64,
    appended: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> BTreeMap<String, u64> {
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let started = tokio::time::Instant::now();
    let mut n = 0;
    while n < total && !stop.load(Ordering::Relaxed) {
        let stream = format!("Load-{}", (n / per_append) % streams);
        let count = per_append.min(total - n);
        let events = (0..count)
            .map(|i| EventData::new("Loaded", json!({ "n": n + i })))
            .collect();
        store
            .append(
                &StreamId::new(&stream).unwrap(),
                ExpectedVersion::Any,
                events,
            )
            .await
            .expect("appends go on whatever the broker does");
        *versions.entry(stream).or_default() += count;
        n += count;
        appended.store(n, Ordering::Relaxed);
        tokio::time::sleep_until(started + Duration::from_secs_f64(n as f64 / rate as f64)).await;
    }
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_for_10_seconds_loses_nothing() {
    const TOTAL: u64 = 50_000;
    let mut nats = server();
    let dir = tempfile::tempdir().unwrap();
    let (store, db) = open_sqlite(&dir.path().join("f.db"));
    db.add_publication(Publication::category("Load"))
        .await
        .unwrap();
    let sink = Arc::new(
        NatsSink::connect(NatsSinkConfig::new(nats.url()))
            .await
            .unwrap(),
    );
    let relay = Relay::new(db.clone(), sink, relay_config("r")).woken_by(store.watch_head());
    let stats = relay.stats();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(relay.run(stopped));

    let appended = Arc::new(AtomicU64::new(0));
    let loading = tokio::spawn(load(
        store.clone(),
        TOTAL,
        400,
        10,
        2_500,
        appended.clone(),
        Arc::default(),
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The rate over a heartbeat, at its best over a second of samples.
    let mut best_rate: f64 = 0.0;
    for _ in 0..10 {
        best_rate = best_rate.max(stats.snapshot().publish_rate_per_s);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(best_rate > 500.0, "{best_rate}");
    nats.kill();
    let at_kill = appended.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = appended.load(Ordering::Relaxed) - at_kill;
    let status = db.status().await.unwrap();
    assert!(
        status.backlog > 1_000 && status.oldest_age_s > 1.0,
        "{status:?}"
    );
    nats.restart().unwrap();
    let expected = loading.await.unwrap();
    wait_for_empty_backlog(&db, Duration::from_secs(120)).await;
    stop.send_replace(true);
    running.await.unwrap().unwrap();

    assert!(
        during > 10_000,
        "appends went on while the broker was down ({during})"
    );
    assert!(stats.snapshot().failed > 0, "the relay saw the outage");
    let received = read_stream(&nats.url(), TOTAL as usize + 1).await;
    assert_eq!(received.len() as u64, TOTAL);
    assert_whole_and_in_order(&received, &expected);
}

const CHILD: &str = "FACTLINE_TEST_RELAY_CHILD";

/// The child: a relay on the store file, printing a line per round.
async fn relay_child(path: &str, url: &str) {
    let db: Arc<dyn OutboxDb> = Arc::new(SqliteOutbox::open(path).unwrap());
    let sink = Arc::new(NatsSink::connect(NatsSinkConfig::new(url)).await.unwrap());
    let config = {
        let mut config = relay_config("child");
        config.batch = 200;
        config
    };
    let relay = Relay::new(db, sink, config);
    loop {
        relay.heartbeat().await.unwrap();
        let round = relay.round().await.unwrap();
        println!("round {} {}", round.pending, round.published);
        if round.pending == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[test]
fn a_relay_killed_10_times_delivers_every_event_exactly_once() {
    const TEST: &str = "a_relay_killed_10_times_delivers_every_event_exactly_once";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(args) = std::env::var(CHILD) {
        let (path, url) = args.split_once(' ').unwrap();
        rt.block_on(relay_child(path, url));
        return;
    }
    let nats = server();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.db");
    let (store, db) = open_sqlite(&path);
    rt.block_on(db.add_publication(Publication::category("Load")))
        .unwrap();
    // The load goes on until the tenth kill, however slow the machine.
    let (appended, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let loading = rt.spawn(load(
        store.clone(),
        u64::MAX,
        300,
        20,
        4_000,
        appended,
        stop.clone(),
    ));

    let mut rng = fastrand::Rng::with_seed(7);
    let mut kills = 0;
    while kills < 10 {
        let mut child = factline_testkit::process::rerun(&factline_testkit::process::test_name(
            module_path!(),
            TEST,
        ))
        .env(CHILD, format!("{} {}", path.display(), nats.url()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let kill_after = rng.usize(2..12);
        let mut busy_rounds = 0;
        for line in lines.map_while(Result::ok) {
            // Kill only while there is work, so the kill lands in a batch.
            if line.starts_with("round ") && !line.starts_with("round 0 ") {
                busy_rounds += 1;
                if busy_rounds == kill_after {
                    std::thread::sleep(Duration::from_millis(rng.u64(0..15)));
                    child.kill().unwrap();
                    kills += 1;
                    break;
                }
            }
        }
        child.wait().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let expected = rt.block_on(loading).unwrap();
    let total: u64 = expected.values().sum();
    assert!(total >= 1_000, "{total}");
    // The last relay, in this process, drains what is left.
    rt.block_on(async {
        let sink = Arc::new(
            NatsSink::connect(NatsSinkConfig::new(nats.url()))
                .await
                .unwrap(),
        );
        let relay = Relay::new(db.clone(), sink, relay_config("child"));
        loop {
            relay.heartbeat().await.unwrap();
            if relay.round().await.unwrap().pending == 0 {
                break;
            }
        }
        assert_eq!(db.status().await.unwrap().backlog, 0);
    });

    let received = rt.block_on(read_stream(&nats.url(), total as usize + 1));
    assert_eq!(
        received.len() as u64,
        total,
        "JetStream's window dropped the re-publishes"
    );
    assert_whole_and_in_order(&received, &expected);

    // The consumer applies each delivery through its inbox, twice over
    // (as if everything were redelivered): its state is exactly-once.
    let consumer = rusqlite::Connection::open(dir.path().join("consumer.db")).unwrap();
    inbox::sqlite::setup(&consumer).unwrap();
    consumer
        .execute_batch(
            "CREATE TABLE applied (stream TEXT, version INTEGER, PRIMARY KEY (stream, version))",
        )
        .unwrap();
    let mut ignored = 0;
    let mut consumer = consumer;
    for r in received.iter().chain(received.iter()) {
        let tx = consumer.transaction().unwrap();
        if inbox::sqlite::first_delivery(&tx, "test", r.event.event_id).unwrap() {
            tx.execute(
                "INSERT INTO applied VALUES (?1, ?2)",
                rusqlite::params![r.event.stream_id.as_str(), r.event.version as i64],
            )
            .unwrap();
        } else {
            ignored += 1;
        }
        tx.commit().unwrap();
    }
    let applied: i64 = consumer
        .query_row("SELECT count(*) FROM applied", [], |r| r.get(0))
        .unwrap();
    assert_eq!((applied as u64, ignored), (total, total as usize));
    let ids: HashSet<_> = received.iter().map(|r| r.event.event_id).collect();
    assert_eq!(ids.len() as u64, total);
}
