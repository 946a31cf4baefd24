//! The outbox on SQLite and PostgreSQL: records written in the append's
//! transaction, relayed in per-stream order, marked only when the sink
//! acknowledged, lanes shared between relays, retention.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use factline_core::{
    EventData, EventStore, ExpectedVersion, InlineError, RecordedEvent, StoreError, StreamId,
};
use factline_outbox::{
    Message, OutboxDb, PostgresOutbox, Publication, Relay, RelayConfig, Sink, SinkError,
    SqliteOutbox, LANES,
};
use serde_json::json;

/// Refuses events of type `Refused`, after the events were inserted: the
/// append's rollback must take its outbox records along.
#[derive(Default)]
struct Refuser {
    applied: u64,
    before: u64,
}

impl Refuser {
    fn apply_events(&mut self, events: &[RecordedEvent]) -> Result<(), InlineError> {
        refuse(events)?;
        self.before = self.applied;
        self.applied = events.last().map_or(self.applied, |e| e.position);
        Ok(())
    }
}

impl factline_sqlite::InlineProjection for Refuser {
    fn name(&self) -> &str {
        "refuser"
    }
    fn checkpoint(&mut self, _: &rusqlite::Transaction<'_>) -> Result<u64, InlineError> {
        Ok(self.applied)
    }
    fn apply(
        &mut self,
        _: &rusqlite::Transaction<'_>,
        events: &[RecordedEvent],
    ) -> Result<(), InlineError> {
        self.apply_events(events)
    }
    fn rolled_back(&mut self) {
        self.applied = self.before;
    }
}

#[async_trait]
impl factline_postgres::InlineProjection for Refuser {
    fn name(&self) -> &str {
        "refuser"
    }
    async fn checkpoint(&mut self, _: &tokio_postgres::Client) -> Result<u64, InlineError> {
        Ok(self.applied)
    }
    async fn apply(
        &mut self,
        _: &tokio_postgres::Client,
        events: &[RecordedEvent],
    ) -> Result<(), InlineError> {
        self.apply_events(events)
    }
    fn rolled_back(&mut self) {
        self.applied = self.before;
    }
}

fn refuse(events: &[RecordedEvent]) -> Result<(), InlineError> {
    match events.iter().find(|e| e.event_type == "Refused") {
        Some(e) => Err(InlineError::refused(e.position, "refused")),
        None => Ok(()),
    }
}

/// Says, from a message's type, whether the sink refuses it for good.
type Refusal = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// Takes every message, or fails the ones `fail` says, remembering what it
/// took in order.
#[derive(Default)]
struct Collecting {
    taken: Mutex<Vec<Message>>,
    /// Fails a message when this returns true for its position and the
    /// number of times it was offered before.
    fail: Option<Box<dyn Fn(u64, usize) -> bool + Send + Sync>>,
    /// Refuses a message for good when this returns true for its type.
    refuse: Option<Refusal>,
    offered: Mutex<BTreeMap<u64, usize>>,
    /// Streams with a message being published now: the relay has waves
    /// out at once, never two holding one stream.
    out: Mutex<std::collections::HashSet<String>>,
}

#[async_trait]
impl Sink for Collecting {
    fn describe(&self) -> String {
        "collecting".into()
    }
    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        let mut streams = std::collections::HashSet::new();
        for m in messages {
            assert!(
                self.out.lock().unwrap().insert(m.stream_id.clone()),
                "{} is in two waves at once",
                m.stream_id
            );
        }
        // Another wave may be sent meanwhile.
        tokio::task::yield_now().await;
        let results = messages
            .iter()
            .map(|m| {
                assert!(
                    streams.insert(m.stream_id.clone()),
                    "two records of one stream in a wave"
                );
                let mut offered = self.offered.lock().unwrap();
                let times = offered.entry(m.position).or_insert(0);
                let fails = self.fail.as_ref().is_some_and(|f| f(m.position, *times));
                *times += 1;
                if self.refuse.as_ref().is_some_and(|r| r(&m.event_type)) {
                    Err(SinkError::permanent(format!(
                        "{} is not accepted here",
                        m.event_type
                    )))
                } else if fails {
                    Err(SinkError::retryable("flaky"))
                } else {
                    self.taken.lock().unwrap().push(m.clone());
                    Ok(())
                }
            })
            .collect();
        let mut out = self.out.lock().unwrap();
        for m in messages {
            out.remove(&m.stream_id);
        }
        results
    }
}

fn event(kind: &str, n: u64) -> EventData {
    EventData::new(kind, json!({ "n": n }))
}

async fn append(
    store: &Arc<dyn EventStore>,
    stream: &str,
    events: Vec<EventData>,
) -> Result<u64, StoreError> {
    let stream = StreamId::new(stream).unwrap();
    store
        .append(&stream, ExpectedVersion::Any, events)
        .await
        .map(|r| r.last_position)
}

fn quick(relay_id: &str) -> RelayConfig {
    let mut config = RelayConfig::default();
    config.relay_id = relay_id.into();
    config.batch = 64;
    config.lease_ttl = Duration::from_secs(5);
    config.heartbeat = Duration::from_millis(100);
    config.fallback_poll = Duration::from_millis(50);
    config.min_backoff = Duration::from_millis(5);
    config.max_backoff = Duration::from_millis(20);
    config
}

/// Runs rounds until a round finds nothing pending.
/// A relay that purges every published record, `batch` at a time.
fn purger(db: &Arc<dyn OutboxDb>, batch: usize) -> Relay {
    Relay::new(db.clone(), Arc::new(Collecting::default()), {
        let mut config = quick("r2");
        config.retention = Duration::ZERO;
        config.purge_batch = batch;
        config
    })
}

async fn drain(relay: &Relay) {
    relay.heartbeat().await.unwrap();
    for _ in 0..10_000 {
        let round = relay.round().await.unwrap();
        if round.pending == 0 {
            return;
        }
    }
    panic!("the outbox never drained");
}

/// Per stream: the versions delivered, in delivery order.
fn by_stream(messages: &[Message]) -> BTreeMap<String, Vec<u64>> {
    let mut streams: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in messages {
        streams
            .entry(m.stream_id.clone())
            .or_default()
            .push(m.version);
    }
    streams
}

async fn captured_in_the_append_transaction(store: Arc<dyn EventStore>, db: Arc<dyn OutboxDb>) {
    // Before any publication, appends write no record.
    append(&store, "Order-0", vec![event("Placed", 0)])
        .await
        .unwrap();
    let orders = db
        .add_publication(Publication::category("Order"))
        .await
        .unwrap();
    assert_eq!(orders.id, 1);
    assert_eq!(db.publications().await.unwrap(), vec![orders.clone()]);

    append(
        &store,
        "Order-1",
        vec![event("Placed", 1), event("Paid", 1)],
    )
    .await
    .unwrap();
    append(&store, "Customer-1", vec![event("Registered", 1)])
        .await
        .unwrap();
    let refused = append(
        &store,
        "Order-2",
        vec![event("Placed", 2), event("Refused", 2)],
    )
    .await;
    assert!(
        matches!(refused, Err(StoreError::InlineRefused { .. })),
        "{refused:?}"
    );
    let conflict = store
        .append(
            &StreamId::new("Order-1").unwrap(),
            ExpectedVersion::NoStream,
            vec![event("Placed", 9)],
        )
        .await;
    assert!(
        matches!(conflict, Err(StoreError::Conflict { .. })),
        "{conflict:?}"
    );
    append(&store, "Order-1", vec![event("Shipped", 1)])
        .await
        .unwrap();

    let status = db.status().await.unwrap();
    assert_eq!(status.backlog, 3, "{status:?}");
    assert!(status.oldest_pending_at.is_some());

    let sink = Arc::new(Collecting::default());
    let relay = Relay::new(db.clone(), sink.clone(), quick("r1"));
    drain(&relay).await;
    let taken = sink.taken.lock().unwrap().clone();
    let types: Vec<&str> = taken.iter().map(|m| m.event_type.as_str()).collect();
    assert_eq!(types, ["Placed", "Paid", "Shipped"]);
    assert!(taken
        .iter()
        .all(|m| m.stream_id == "Order-1" && m.subject == "factline.Order"));
    let envelope: RecordedEvent = serde_json::from_slice(&taken[1].payload).unwrap();
    assert_eq!(
        (envelope.event_type.as_str(), envelope.version),
        ("Paid", 2)
    );
    assert_eq!(envelope.event_id, taken[1].event_id);
    let status = db.status().await.unwrap();
    assert_eq!((status.backlog, status.published_retained), (0, 3));
    assert_eq!(relay.stats().snapshot().published, 3);

    // Without publications the trigger is gone; records already written
    // would still go out.
    assert!(db.remove_publication(orders.id).await.unwrap());
    append(&store, "Order-3", vec![event("Placed", 3)])
        .await
        .unwrap();
    assert_eq!(db.status().await.unwrap().backlog, 0);

    // Retention removes published records only, in batches.
    db.add_publication(
        Publication::everything()
            .of_type("Placed")
            .on_subject("x.{event_type}.{category}"),
    )
    .await
    .unwrap();
    append(
        &store,
        "Order-4",
        vec![event("Placed", 4), event("Paid", 4)],
    )
    .await
    .unwrap();
    let purger = purger(&db, 2);
    assert_eq!(purger.purge().await.unwrap(), 3);
    let status = db.status().await.unwrap();
    assert_eq!((status.backlog, status.published_retained), (1, 0));
}

async fn order_holds_while_a_sink_fails(store: Arc<dyn EventStore>, db: Arc<dyn OutboxDb>) {
    db.add_publication(Publication::everything()).await.unwrap();
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    // More streams than lanes: a lane holds records of several streams,
    // so records go out above a failed one of their lane.
    for round in 0..6u64 {
        for s in 0..2 * LANES as u64 + 6 {
            let stream = format!("S-{s}");
            let events: Vec<EventData> = (0..1 + (s + round) % 3).map(|n| event("E", n)).collect();
            let versions = expected.entry(stream.clone()).or_default();
            let first = versions.len() as u64 + 1;
            versions.extend(first..first + events.len() as u64);
            append(&store, &stream, events).await.unwrap();
        }
    }
    // Every third record fails its first two offers.
    let sink = Arc::new(Collecting {
        fail: Some(Box::new(|position, times| position % 3 == 0 && times < 2)),
        ..Collecting::default()
    });
    let relay = Relay::new(db.clone(), sink.clone(), quick("r1"));
    // The pipelined path: the next batch is fetched while one is out.
    relay.heartbeat().await.unwrap();
    let published = relay.drain().await.unwrap();
    let taken = sink.taken.lock().unwrap().clone();
    assert_eq!(published, taken.len() as u64);
    assert_eq!(by_stream(&taken), expected, "each stream once, in order");
    let stats = relay.stats().snapshot();
    assert!(
        stats.failed > 0 && stats.last_error.as_deref() == Some("flaky"),
        "{stats:?}"
    );
    // Records acknowledged behind a failed one and records under a
    // checkpoint are all counted once, and retention removes them all.
    let status = db.status().await.unwrap();
    assert_eq!((status.backlog, status.published_retained), (0, published));
    let purger = purger(&db, 7);
    assert_eq!(purger.purge().await.unwrap(), published);
    let status = db.status().await.unwrap();
    assert_eq!((status.backlog, status.published_retained), (0, 0));
}

async fn refused_messages_are_parked_and_their_streams_go_on(
    store: Arc<dyn EventStore>,
    db: Arc<dyn OutboxDb>,
) {
    db.add_publication(Publication::everything()).await.unwrap();
    for s in 0..5 {
        let stream = format!("Invoice-{s}");
        let kinds = ["Issued", "Poison", "Paid"];
        let events = kinds
            .iter()
            .enumerate()
            .map(|(n, k)| event(k, n as u64))
            .collect();
        append(&store, &stream, events).await.unwrap();
    }
    let sink = Arc::new(Collecting {
        refuse: Some(Box::new(|event_type| event_type == "Poison")),
        ..Collecting::default()
    });
    let relay = Relay::new(db.clone(), sink.clone(), quick("r1"));
    relay.heartbeat().await.unwrap();
    assert_eq!(relay.drain().await.unwrap(), 10);

    // Each stream went on past its refused record, in order.
    let taken = sink.taken.lock().unwrap().clone();
    let streams = by_stream(&taken);
    assert_eq!(streams.len(), 5);
    assert!(
        streams.values().all(|versions| versions == &vec![1, 3]),
        "{streams:?}"
    );
    let status = db.status().await.unwrap();
    assert_eq!((status.backlog, status.parked, status.failing), (0, 5, 0));
    assert_eq!(relay.stats().snapshot().parked, 5);
    let parked = db.parked(100).await.unwrap();
    assert_eq!(parked.len(), 5);
    assert!(
        parked.windows(2).all(|w| w[0].position > w[1].position),
        "newest first"
    );
    for record in &parked {
        assert_eq!(record.event_type, "Poison");
        assert!(record.stream_id.starts_with("Invoice-"));
        assert_eq!(record.error, "Poison is not accepted here");
    }
    assert_eq!(db.parked(2).await.unwrap().len(), 2);

    // Parked records are never offered again.
    let offered_before: usize = sink.offered.lock().unwrap().values().sum();
    append(&store, "Invoice-0", vec![event("Paid", 9)])
        .await
        .unwrap();
    assert_eq!(relay.drain().await.unwrap(), 1);
    let offered_after: usize = sink.offered.lock().unwrap().values().sum();
    assert_eq!(offered_after, offered_before + 1);
    // Every record is done: retention removes the parked ones' records
    // with the rest, and the parked list keeps why.
    assert_eq!(purger(&db, 100).purge().await.unwrap(), 16);
    assert_eq!(db.parked(100).await.unwrap().len(), 5);
}

async fn lanes_are_shared_and_handed_over(db: Arc<dyn OutboxDb>) {
    let ttl = Duration::from_millis(600);
    let a = db.heartbeat("a", ttl).await.unwrap();
    assert_eq!(a.len() as i64, LANES, "a lone relay holds every lane");
    let b = db.heartbeat("b", ttl).await.unwrap();
    assert!(b.is_empty(), "the lanes are a's until it gives some back");
    let a = db.heartbeat("a", ttl).await.unwrap();
    assert_eq!(a.len() as i64, LANES / 2, "a gives back beyond its share");
    let b = db.heartbeat("b", ttl).await.unwrap();
    assert_eq!(b.len() as i64, LANES / 2);
    assert!(
        a.iter().all(|lane| !b.contains(lane)),
        "no lane has two holders"
    );
    let status = db.status().await.unwrap();
    let held: Vec<(String, u64)> = status
        .relays
        .iter()
        .map(|r| (r.relay.clone(), r.lanes))
        .collect();
    assert_eq!(held, vec![("a".into(), 16), ("b".into(), 16)]);

    // b stops cleanly: a takes everything at its next heartbeat.
    db.leave("b").await.unwrap();
    assert_eq!(db.heartbeat("a", ttl).await.unwrap().len() as i64, LANES);
    // a dies (no leave, no heartbeat): its leases run out and c takes over.
    let c = db.heartbeat("c", ttl).await.unwrap();
    assert!(c.is_empty());
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let c = db.heartbeat("c", ttl).await.unwrap();
    assert_eq!(c.len() as i64, LANES, "a's expired leases moved to c");
    // a comes back: its old leases are not its own any more.
    let a = db.heartbeat("a", ttl).await.unwrap();
    assert!(a.iter().all(|lane| !c.contains(lane)));
}

async fn bad_publications_are_refused(db: Arc<dyn OutboxDb>) {
    let error = db
        .add_publication(Publication::category("Order").on_subject("a.{nope}"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("{nope}"), "{error}");
    assert!(db.publications().await.unwrap().is_empty());
}

// ---------------------------------------------------------------- SQLite

fn sqlite(dir: &tempfile::TempDir) -> (Arc<dyn EventStore>, Arc<dyn OutboxDb>) {
    let path = dir.path().join("factline.db");
    let store = factline_sqlite::SqliteStore::open_with_inline(
        factline_sqlite::SqliteConfig::new(&path),
        vec![Box::new(Refuser::default())],
    )
    .unwrap();
    let db = SqliteOutbox::open(&path).unwrap();
    (Arc::new(store), Arc::new(db))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_records_are_written_with_the_append_and_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, db) = sqlite(&dir);
    captured_in_the_append_transaction(store, db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_relay_keeps_per_stream_order_while_the_sink_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (store, db) = sqlite(&dir);
    order_holds_while_a_sink_fails(store, db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_lanes_are_shared_and_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, db) = sqlite(&dir);
    lanes_are_shared_and_handed_over(db.clone()).await;
    bad_publications_are_refused(db).await;
}

#[test]
fn sqlite_outbox_needs_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let missing = SqliteOutbox::open(dir.path().join("none.db"))
        .err()
        .unwrap();
    assert!(missing.to_string().contains("does not exist"), "{missing}");
    let empty = dir.path().join("empty.db");
    rusqlite::Connection::open(&empty).unwrap();
    let error = SqliteOutbox::open(&empty).err().unwrap();
    assert!(
        error.to_string().contains("holds no factline store"),
        "{error}"
    );
}

// ------------------------------------------------------------ PostgreSQL

async fn postgres(
    db: &factline_testkit::pg::TestDatabase,
) -> (Arc<dyn EventStore>, Arc<dyn OutboxDb>) {
    let store = factline_postgres::PostgresStore::connect_with_inline(
        factline_postgres::PostgresConfig::new(&db.url),
        vec![Box::new(Refuser::default())],
    )
    .await
    .unwrap();
    let outbox = PostgresOutbox::connect(&db.url, "factline").await.unwrap();
    (Arc::new(store), Arc::new(outbox))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_records_are_written_with_the_append_and_relayed() {
    let db = factline_testkit::pg::database().await;
    let (store, outbox) = postgres(&db).await;
    captured_in_the_append_transaction(store, outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refused_messages_are_parked_and_their_streams_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (store, db) = sqlite(&dir);
    refused_messages_are_parked_and_their_streams_go_on(store, db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refused_messages_are_parked_and_their_streams_go_on() {
    let db = factline_testkit::pg::database().await;
    let (store, outbox) = postgres(&db).await;
    refused_messages_are_parked_and_their_streams_go_on(store, outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relay_keeps_per_stream_order_while_the_sink_fails() {
    let db = factline_testkit::pg::database().await;
    let (store, outbox) = postgres(&db).await;
    order_holds_while_a_sink_fails(store, outbox).await;
}

/// Records an earlier version marked published in place are moved to the
/// log of published records when the outbox connects; retention then
/// deletes them with the rest, and pending records stay pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_records_marked_in_place_move_to_the_published_log() {
    let db = factline_testkit::pg::database().await;
    let (store, outbox) = postgres(&db).await;
    outbox
        .add_publication(Publication::everything())
        .await
        .unwrap();
    for n in 0..5 {
        append(&store, &format!("S-{n}"), vec![event("E", n)])
            .await
            .unwrap();
    }
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // As an earlier version left it: no log, records marked in place, no
    // migrations recorded.
    client
        .batch_execute(
            "DROP TABLE factline.outbox_done;
             DELETE FROM factline.factline_migrations WHERE component = 'outbox';
             UPDATE factline.outbox SET published_at = now() - interval '2 hours'
             WHERE position <= 3",
        )
        .await
        .unwrap();
    drop(outbox);
    let outbox: Arc<dyn OutboxDb> =
        Arc::new(PostgresOutbox::connect(&db.url, "factline").await.unwrap());
    let status = outbox.status().await.unwrap();
    assert_eq!((status.backlog, status.published_retained), (2, 3));

    let sink = Arc::new(Collecting::default());
    let relay = Relay::new(outbox.clone(), sink.clone(), {
        let mut config = quick("r1");
        config.retention = Duration::from_secs(3600);
        config
    });
    drain(&relay).await;
    let positions: Vec<u64> = sink
        .taken
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.position)
        .collect();
    assert_eq!(positions, [4, 5], "only the pending records go out");
    assert_eq!(outbox.status().await.unwrap().published_retained, 5);
    // Only the moved records are older than the retention.
    assert_eq!(relay.purge().await.unwrap(), 3);
    let status = outbox.status().await.unwrap();
    assert_eq!((status.backlog, status.published_retained), (0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lanes_are_shared_and_handed_over() {
    let db = factline_testkit::pg::database().await;
    let (_store, outbox) = postgres(&db).await;
    lanes_are_shared_and_handed_over(outbox.clone()).await;
    bad_publications_are_refused(outbox).await;
}

// ----------------------------------------------------------------- inbox

#[test]
fn sqlite_inbox_ignores_redeliveries_and_forgets_rolled_back_ones() {
    use factline_outbox::inbox::sqlite as inbox;
    let dir = tempfile::tempdir().unwrap();
    let mut conn = rusqlite::Connection::open(dir.path().join("consumer.db")).unwrap();
    inbox::setup(&conn).unwrap();
    let (first, second) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    // A delivery whose processing rolls back is not recorded.
    let tx = conn.transaction().unwrap();
    assert!(inbox::first_delivery(&tx, "billing", first).unwrap());
    drop(tx);
    let tx = conn.transaction().unwrap();
    assert!(inbox::first_delivery(&tx, "billing", first).unwrap());
    assert!(
        !inbox::first_delivery(&tx, "billing", first).unwrap(),
        "a redelivery"
    );
    assert!(
        inbox::first_delivery(&tx, "shipping", first).unwrap(),
        "consumers are apart"
    );
    assert!(inbox::first_delivery(&tx, "billing", second).unwrap());
    tx.commit().unwrap();
    assert!(!inbox::first_delivery(&conn, "billing", second).unwrap());
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(inbox::purge(&conn, later).unwrap(), 3);
    assert!(inbox::first_delivery(&conn, "billing", second).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_inbox_ignores_redeliveries_and_forgets_rolled_back_ones() {
    use factline_outbox::inbox::postgres as inbox;
    let db = factline_testkit::pg::database().await;
    let mut client = factline_testkit::pg::connect(&db.url).await;
    client
        .batch_execute("CREATE SCHEMA consumer")
        .await
        .unwrap();
    inbox::setup(&client, "consumer").await.unwrap();
    let id = uuid::Uuid::now_v7();
    let tx = client.transaction().await.unwrap();
    assert!(inbox::first_delivery(&tx, "consumer", "billing", id)
        .await
        .unwrap());
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    assert!(inbox::first_delivery(&tx, "consumer", "billing", id)
        .await
        .unwrap());
    assert!(!inbox::first_delivery(&tx, "consumer", "billing", id)
        .await
        .unwrap());
    assert!(inbox::first_delivery(&tx, "consumer", "shipping", id)
        .await
        .unwrap());
    tx.commit().await.unwrap();
    assert!(!inbox::first_delivery(&client, "consumer", "billing", id)
        .await
        .unwrap());
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(inbox::purge(&client, "consumer", later).await.unwrap(), 2);
}
