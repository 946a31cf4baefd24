//! Projections with their checkpoint in the read model's transaction, on
//! SQLite and PostgreSQL, with the read model in the events' own database
//! and in another one: batches, a refused event rolling its batch back,
//! resuming without applying anything twice, and following live appends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factline_core::{EventData, EventStore, ExpectedVersion, RecordedEvent, StreamId};
use factline_projections::{
    ApplyError, BatchPolicy, Freshness, OnTimeout, Parking, PoisonPolicy, PostgresAdmin,
    PostgresProjection, PostgresSink, ProjectionError, ProjectionInfo, RetryPolicy, Runner, Sink,
    SqliteAdmin, SqliteProjection, SqliteSink, Tables, VersionedSink,
};
use serde_json::json;

/// Counts events per type; refuses the event at `refuse_at`.
struct Counts {
    refuse_at: Option<u64>,
    version: u32,
    /// Events of this type are left out.
    skip: Option<&'static str>,
    /// What each event adds to its type's count.
    weight: i64,
}

impl SqliteProjection for Counts {
    fn name(&self) -> &str {
        "counts"
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn tables(&self) -> &[&str] {
        &["counts"]
    }
    fn setup(&mut self, tx: &rusqlite::Transaction<'_>, tables: &Tables) -> rusqlite::Result<()> {
        tx.execute(
            &format!(
                "CREATE TABLE IF NOT EXISTS {} (event_type TEXT PRIMARY KEY, n INTEGER NOT NULL)",
                tables.get("counts")
            ),
            [],
        )
        .map(|_| ())
    }
    fn apply(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        if self.refuse_at == Some(event.position) {
            return Err(ApplyError::new("refused on purpose"));
        }
        if self.skip == Some(event.event_type.as_str()) {
            return Ok(());
        }
        tx.execute(
            &format!(
                "INSERT INTO {} (event_type, n) VALUES (?1, ?2)
                 ON CONFLICT (event_type) DO UPDATE SET n = n + excluded.n",
                tables.get("counts")
            ),
            rusqlite::params![event.event_type, self.weight],
        )?;
        Ok(())
    }
}

#[async_trait]
impl PostgresProjection for Counts {
    fn name(&self) -> &str {
        "counts"
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn tables(&self) -> &[&str] {
        &["counts"]
    }
    async fn setup(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &Tables,
    ) -> Result<(), tokio_postgres::Error> {
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (event_type text PRIMARY KEY, n bigint NOT NULL)",
            tables.get("counts")
        ))
        .await
    }
    async fn apply(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &Tables,
        event: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        if self.refuse_at == Some(event.position) {
            return Err(ApplyError::new("refused on purpose"));
        }
        if self.skip == Some(event.event_type.as_str()) {
            return Ok(());
        }
        let table = tables.get("counts");
        tx.execute(
            &format!(
                "INSERT INTO {table} AS c (event_type, n) VALUES ($1, $2)
                 ON CONFLICT (event_type) DO UPDATE SET n = c.n + excluded.n"
            ),
            &[&event.event_type, &self.weight],
        )
        .await?;
        Ok(())
    }
}

/// A store and a read-model database beside it.
#[async_trait]
trait Target: Sized + Sync {
    type Sink: VersionedSink + Parking + 'static;
    async fn start() -> Self;
    fn store(&self) -> Arc<dyn EventStore>;
    /// A sink for `counts`: a live one, or (`rebuild`) one building its
    /// version beside the active one.
    async fn open(&self, counts: Counts, rebuild: bool) -> Self::Sink;
    async fn sink(&self, refuse_at: Option<u64>) -> Self::Sink {
        let counts = Counts {
            refuse_at,
            ..version(1)
        };
        self.open(counts, false).await
    }
    async fn has_table(sink: &mut Self::Sink, table: &str) -> bool;
    /// What an operator sees of the read-model database's projections.
    async fn projections(&self) -> Vec<ProjectionInfo>;
    /// Pauses or resumes, as an operator in another process would.
    async fn set_paused(&self, name: &str, paused: bool);
    /// The read model and the checkpoint, read in one go.
    async fn read_model(sink: &mut Self::Sink) -> (BTreeMap<String, i64>, u64);
}

/// `SAME`: the read model is in the events' file; else in a file of its own.
struct Sqlite<const SAME: bool> {
    dir: tempfile::TempDir,
    store: Arc<dyn EventStore>,
}

#[async_trait]
impl<const SAME: bool> Target for Sqlite<SAME> {
    type Sink = SqliteSink<Counts>;
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = factline_sqlite::SqliteStore::open(dir.path().join("events.db")).unwrap();
        Sqlite {
            dir,
            store: Arc::new(store),
        }
    }
    fn store(&self) -> Arc<dyn EventStore> {
        self.store.clone()
    }
    async fn open(&self, counts: Counts, rebuild: bool) -> Self::Sink {
        let path = self.read_path();
        match rebuild {
            false => SqliteSink::open(path, counts).unwrap(),
            true => SqliteSink::open_rebuild(path, counts).unwrap(),
        }
    }
    async fn projections(&self) -> Vec<ProjectionInfo> {
        let path = self.read_path();
        SqliteAdmin::open(path)
            .unwrap()
            .projections()
            .await
            .unwrap()
    }
    async fn set_paused(&self, name: &str, paused: bool) {
        let admin = SqliteAdmin::open(self.read_path()).unwrap();
        admin.set_paused(name, paused).await.unwrap()
    }
    async fn has_table(sink: &mut Self::Sink, table: &str) -> bool {
        let table = table.to_owned();
        sink.query(move |conn| {
            conn.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE name = ?1",
                [table],
                |r| r.get(0),
            )
        })
        .await
        .unwrap()
    }
    async fn read_model(sink: &mut Self::Sink) -> (BTreeMap<String, i64>, u64) {
        let counts = sink
            .query(|conn| {
                let exists: bool = conn.query_row(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'counts'",
                    [],
                    |r| r.get(0),
                )?;
                if !exists {
                    return Ok(BTreeMap::new());
                }
                let mut stmt = conn.prepare("SELECT event_type, n FROM counts")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await
            .unwrap();
        (counts, sink.checkpoint().await.unwrap())
    }
}

impl<const SAME: bool> Sqlite<SAME> {
    fn read_path(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join(if SAME { "events.db" } else { "read.db" })
    }
}

/// `SAME`: the read model is in the events' database; else in another.
struct Postgres<const SAME: bool> {
    events: factline_testkit::pg::TestDatabase,
    read: factline_testkit::pg::TestDatabase,
    store: Arc<dyn EventStore>,
}

#[async_trait]
impl<const SAME: bool> Target for Postgres<SAME> {
    type Sink = PostgresSink<Counts>;
    async fn start() -> Self {
        let events = factline_testkit::pg::database().await;
        let read = factline_testkit::pg::database().await;
        let store = factline_postgres::PostgresStore::connect(&events.url)
            .await
            .unwrap();
        Postgres {
            events,
            read,
            store: Arc::new(store),
        }
    }
    fn store(&self) -> Arc<dyn EventStore> {
        self.store.clone()
    }
    async fn projections(&self) -> Vec<ProjectionInfo> {
        let admin = PostgresAdmin::connect(self.read_url(), "read").await;
        admin.unwrap().projections().await.unwrap()
    }
    async fn set_paused(&self, name: &str, paused: bool) {
        let admin = PostgresAdmin::connect(self.read_url(), "read").await;
        admin.unwrap().set_paused(name, paused).await.unwrap()
    }
    async fn open(&self, counts: Counts, rebuild: bool) -> Self::Sink {
        let url = self.read_url();
        match rebuild {
            false => PostgresSink::connect(url, "read", counts).await.unwrap(),
            true => PostgresSink::connect_rebuild(url, "read", counts)
                .await
                .unwrap(),
        }
    }
    async fn has_table(sink: &mut Self::Sink, table: &str) -> bool {
        let name = format!("read.{table}");
        sink.client()
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .unwrap()
            .get(0)
    }
    async fn read_model(sink: &mut Self::Sink) -> (BTreeMap<String, i64>, u64) {
        let rows = sink
            .client()
            .query(
                "SELECT event_type, n FROM read.counts
                 WHERE to_regclass('read.counts') IS NOT NULL",
                &[],
            )
            .await
            .unwrap_or_default();
        let counts = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        (counts, sink.checkpoint().await.unwrap())
    }
}

impl<const SAME: bool> Postgres<SAME> {
    fn read_url(&self) -> &str {
        if SAME {
            &self.events.url
        } else {
            &self.read.url
        }
    }
}

const TYPES: [&str; 3] = ["Placed", "Paid", "Shipped"];

/// `n` events over a few streams; event k has type `TYPES[k % 3]`.
async fn append(store: &Arc<dyn EventStore>, n: u64) {
    for chunk in 0..n.div_ceil(100) {
        let events = (chunk * 100..(chunk * 100 + 100).min(n))
            .map(|k| EventData::new(TYPES[(k % 3) as usize], json!({ "k": k })))
            .collect();
        let stream = StreamId::new(format!("Order-{}", chunk % 7)).unwrap();
        store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
}

fn expected_counts(n: u64) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    for k in 0..n {
        *counts
            .entry(TYPES[(k % 3) as usize].to_string())
            .or_default() += 1;
    }
    counts
}

async fn catches_up_in_batches_with_the_checkpoint<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 1234).await;
    let mut runner = Runner::new(target.store(), target.sink(None).await);
    let stats = runner.catch_up(u64::MAX).await.unwrap();
    assert_eq!((stats.events, stats.checkpoint), (1234, 1234));
    assert_eq!(stats.largest_batch, 500, "batches hold at most 500 events");
    assert!(stats.batches >= 3, "{stats:?}");
    let (counts, checkpoint) = T::read_model(&mut runner.into_sink()).await;
    assert_eq!((counts, checkpoint), (expected_counts(1234), 1234));
}

/// Quick retries for tests.
fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        first_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
    }
}

/// P8 with the stop policy: the failing event is retried, then the run
/// stops and says why; what came before it is committed with the
/// checkpoint, and a restart applies every event once.
async fn a_poison_event_stops_the_projection_and_resuming_applies_each_event_once<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 1234).await;
    let mut runner =
        Runner::new(target.store(), target.sink(Some(700)).await).with_retries(quick_retries());
    match runner.catch_up(u64::MAX).await {
        Err(ProjectionError::Apply {
            position, message, ..
        }) => {
            assert_eq!(position, 700);
            assert!(message.contains("after 3 attempts"), "{message}");
        }
        other => panic!("expected the refusal at 700, got {other:?}"),
    }
    let mut sink = runner.into_sink();
    let (counts, checkpoint) = T::read_model(&mut sink).await;
    assert_eq!(checkpoint, 699, "everything before the poison event is in");
    assert_eq!(
        counts,
        expected_counts(699),
        "read model and checkpoint move together"
    );

    // A new run (as after a restart) resumes from the checkpoint.
    let mut runner = Runner::new(target.store(), target.sink(None).await);
    let stats = runner.catch_up(u64::MAX).await.unwrap();
    assert_eq!(stats.events, 535);
    let (counts, checkpoint) = T::read_model(&mut runner.into_sink()).await;
    assert_eq!((counts, checkpoint), (expected_counts(1234), 1234));
}

/// P8 with the park policy: the poison event is parked with its error, and
/// every later event of its stream is parked behind it; the rest goes on.
/// Parked events are listed, retried (in stream order) and skipped.
async fn poison_events_are_parked_with_their_stream_held_back<T: Target>() {
    let target = T::start().await;
    // Position 150 is in stream Order-1, which also holds 101..200 and
    // 801..900 (see `append`).
    append(&target.store(), 1000).await;
    let parking = |runner: Runner<T::Sink>| {
        runner
            .with_retries(quick_retries())
            .with_poison_policy(PoisonPolicy::Park)
    };
    let mut runner = parking(Runner::new(target.store(), target.sink(Some(150)).await));
    let status = runner.status();
    runner.catch_up(u64::MAX).await.unwrap();
    let lag = status.lag(1000);
    assert_eq!((lag.checkpoint, lag.parked, lag.skipped), (1000, 151, 0));
    let mut sink = runner.into_sink();
    let parked = sink.parked().await.unwrap();
    let positions: Vec<u64> = parked.iter().map(|p| p.position).collect();
    let held: Vec<u64> = (150..=200).chain(801..=900).collect();
    assert_eq!(positions, held);
    assert_eq!(
        (parked[0].attempts, parked[0].error.as_str()),
        (3, "refused on purpose")
    );
    assert!(parked[1..]
        .iter()
        .all(|p| p.attempts == 0 && p.error.contains("held back")));
    assert!(parked.iter().all(|p| p.stream_id == "Order-1"));
    let (counts, _) = T::read_model(&mut sink).await;
    let mut expected = expected_counts(1000);
    for position in &held {
        let event_type = TYPES[((position - 1) % 3) as usize];
        *expected.get_mut(event_type).unwrap() -= 1;
    }
    assert_eq!(counts, expected, "everything else was applied");

    // Retrying while the event still fails changes nothing.
    let report = sink.retry(target.store().as_ref()).await.unwrap();
    assert_eq!((report.applied, report.still_parked), (0, 151));
    assert_eq!(sink.parked().await.unwrap()[0].attempts, 4);

    // Fixed: a retry applies them all, in order.
    let mut fixed = target.sink(None).await;
    let report = fixed.retry(target.store().as_ref()).await.unwrap();
    assert_eq!((report.applied, report.still_parked), (151, 0));
    assert!(fixed.parked().await.unwrap().is_empty());
    assert_eq!(
        T::read_model(&mut fixed).await,
        (expected_counts(1000), 1000)
    );
}

/// Skipping a parked event lets the events held behind it through on the
/// next retry; the skip is counted.
async fn skipped_events_release_their_stream_on_retry<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 300).await;
    let mut runner = Runner::new(target.store(), target.sink(Some(150)).await)
        .with_retries(quick_retries())
        .with_poison_policy(PoisonPolicy::Park);
    runner.catch_up(u64::MAX).await.unwrap();
    let mut sink = runner.into_sink();
    assert_eq!(sink.parked().await.unwrap().len(), 51);
    assert!(sink.skip(150).await.unwrap());
    assert!(!sink.skip(150).await.unwrap(), "skipped already");
    let report = sink.retry(target.store().as_ref()).await.unwrap();
    assert_eq!((report.applied, report.still_parked), (50, 0));
    assert_eq!(sink.parked_counts().await.unwrap(), (0, 1));
    let (counts, _) = T::read_model(&mut sink).await;
    let mut expected = expected_counts(300);
    *expected.get_mut(TYPES[(149 % 3) as usize]).unwrap() -= 1;
    assert_eq!(counts, expected, "all but the skipped event");
    // A restarted runner reports the skip in its lag.
    let mut runner = Runner::new(target.store(), sink);
    let status = runner.status();
    runner.catch_up(u64::MAX).await.unwrap();
    assert_eq!((status.lag(300).parked, status.lag(300).skipped), (0, 1));
}

async fn follows_live_appends_until_stopped<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 10).await;
    let mut runner =
        Runner::new(target.store(), target.sink(None).await).with_policy(BatchPolicy {
            max_events: 500,
            max_wait: Duration::from_millis(20),
        });
    let mut progress = runner.watch_checkpoint();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move {
        let stats = runner.run(stopped).await;
        (stats, runner)
    });
    append(&target.store(), 300).await;
    let head = target.store().head_position().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), progress.wait_for(|p| *p == head))
        .await
        .expect("the projection reaches the head")
        .unwrap();
    stop.send_replace(true);
    let (stats, runner) = running.await.unwrap();
    assert_eq!(stats.unwrap().checkpoint, head);
    let (counts, checkpoint) = T::read_model(&mut runner.into_sink()).await;
    let mut expected = expected_counts(10);
    for (t, n) in expected_counts(300) {
        *expected.entry(t).or_default() += n;
    }
    assert_eq!((counts, checkpoint), (expected, 310));
}

/// An operator's pause holds every batch back (also one already waiting
/// to commit) until resumed; a paused runner still stops when told, and
/// the admin view shows the projection's state.
async fn pause_holds_batches_back_until_resumed<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 10).await;
    let mut runner =
        Runner::new(target.store(), target.sink(None).await).with_policy(BatchPolicy {
            max_events: 500,
            max_wait: Duration::from_millis(20),
        });
    let status = runner.status();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { runner.run(stopped).await });
    status.wait_for(10, Duration::from_secs(30)).await.unwrap();
    let listed = target.projections().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].name.as_str(), listed[0].active_version),
        ("counts", Some(1))
    );
    assert_eq!((listed[0].checkpoint, listed[0].paused), (10, false));

    target.set_paused("counts", true).await;
    append(&target.store(), 30).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(status.checkpoint(), 10, "nothing commits while paused");
    assert!(status.is_paused());
    let listed = target.projections().await;
    assert_eq!((listed[0].checkpoint, listed[0].paused), (10, true));

    target.set_paused("counts", false).await;
    status.wait_for(40, Duration::from_secs(30)).await.unwrap();
    assert!(!status.is_paused());

    // Stopping a paused runner ends it without committing.
    target.set_paused("counts", true).await;
    append(&target.store(), 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send_replace(true);
    let stats = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("a paused runner stops when told")
        .unwrap()
        .unwrap();
    assert_eq!(stats.checkpoint, 40);
    let (counts, checkpoint) = T::read_model(&mut target.sink(None).await).await;
    let mut expected = expected_counts(10);
    for (t, n) in expected_counts(30) {
        *expected.entry(t).or_default() += n;
    }
    assert_eq!((counts, checkpoint), (expected, 40));
}

/// Two runners of one projection (say, in two processes without a lease):
/// the one that read the checkpoint before the other moved it cannot
/// apply those events again; its batch is rolled back as contended.
async fn a_second_runner_cannot_apply_events_the_first_applied<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 300).await;
    let mut late = Runner::new(target.store(), target.sink(None).await).with_policy(BatchPolicy {
        max_events: 50,
        max_wait: Duration::from_millis(100),
    });
    let mut early = Runner::new(target.store(), target.sink(None).await);
    // Both start from 0: `late` reads its checkpoint first...
    assert_eq!(late.sink_mut().checkpoint().await.unwrap(), 0);
    early.catch_up(u64::MAX).await.unwrap();
    // ...and then finds it moved.
    match late
        .sink_mut()
        .apply_batch(target.store().read_all(1, 50).await.unwrap().into())
        .await
    {
        Err(ProjectionError::Contended {
            expected, found, ..
        }) => {
            assert_eq!((expected, found), (0, 300))
        }
        other => panic!("a second runner applied events again: {other:?}"),
    }
    // Started afresh it reads the moved checkpoint and has nothing to do.
    let stats = late.catch_up(u64::MAX).await.unwrap();
    assert_eq!((stats.events, stats.checkpoint), (0, 300));
    let (counts, checkpoint) = T::read_model(&mut early.into_sink()).await;
    assert_eq!((counts, checkpoint), (expected_counts(300), 300));
}

/// Lag in events and seconds (P9): behind before a run, part-way after a
/// partial catch-up, nothing once caught up.
async fn lag_counts_events_and_seconds_behind<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 1000).await;
    let mut runner = Runner::new(target.store(), target.sink(None).await);
    let status = runner.status();
    assert_eq!(status.lag(1000).events_behind, 1000);
    // Let the events age a little, so the lag in seconds is above zero.
    tokio::time::sleep(Duration::from_millis(20)).await;
    runner.catch_up(500).await.unwrap();
    let lag = status.lag(1000);
    assert_eq!((lag.checkpoint, lag.events_behind), (500, 500));
    assert!(lag.seconds_behind > 0.0, "{lag:?}");
    assert_eq!((lag.skipped, lag.parked), (0, 0));

    // A new runner (a restart) knows the last applied event's time too.
    let mut restarted = Runner::new(target.store(), target.sink(None).await);
    let status = restarted.status();
    restarted.catch_up(600).await.unwrap();
    assert!(status.lag(1000).seconds_behind > 0.0);
    restarted.catch_up(u64::MAX).await.unwrap();
    let lag = status.lag(1000);
    assert_eq!((lag.events_behind, lag.seconds_behind), (0, 0.0));
}

/// Read-your-writes (P11): a read waits for the position its write
/// returned; past the timeout it fails, or answers flagged as stale.
async fn reads_wait_for_the_position_of_a_write<T: Target>() {
    let target = T::start().await;
    let store = target.store();
    let mut runner = Runner::new(store.clone(), target.sink(None).await).with_policy(BatchPolicy {
        max_events: 500,
        max_wait: Duration::from_millis(10),
    });
    let status = runner.status();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { runner.run(stopped).await });
    let order = StreamId::new("Order-ryw").unwrap();
    let one = || vec![EventData::new("Placed", json!({}))];
    let written = store
        .append(&order, ExpectedVersion::Any, one())
        .await
        .unwrap();
    let answer = status
        .read_at(written.last_position, Freshness::default(), || async {
            "read"
        })
        .await
        .unwrap();
    assert!(!answer.stale);
    assert!(status.checkpoint() >= written.last_position);
    stop.send_replace(true);
    running.await.unwrap().unwrap();

    // Nobody projects any more: the next write is never reached.
    let unseen = store
        .append(&order, ExpectedVersion::Any, one())
        .await
        .unwrap();
    let short = Freshness {
        timeout: Duration::from_millis(100),
        on_timeout: OnTimeout::Fail,
    };
    let not_yet = status
        .read_at(unseen.last_position, short, || async { "read" })
        .await
        .unwrap_err();
    assert_eq!(
        (not_yet.wanted, not_yet.reached),
        (unseen.last_position, written.last_position)
    );
    let stale = Freshness {
        on_timeout: OnTimeout::AnswerStale,
        ..short
    };
    let answer = status
        .read_at(unseen.last_position, stale, || async { "read" })
        .await
        .unwrap();
    assert_eq!((answer.value, answer.stale), ("read", true));
    assert_eq!(Freshness::default().timeout, Duration::from_secs(5));
}

fn doubled(counts: BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    counts.into_iter().map(|(t, n)| (t, n * 2)).collect()
}

/// Version `n` counts each event `n` times, so versions differ.
fn version(version: u32) -> Counts {
    Counts {
        refuse_at: None,
        version,
        skip: None,
        weight: i64::from(version),
    }
}

/// P4: before a swap, the rebuilt version can be compared with the active
/// one: rows added, removed and changed, with samples.
async fn diff_reports_what_a_swap_would_change<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 999).await;
    let v1 = Counts {
        skip: Some("Paid"),
        ..version(1)
    };
    let mut active = Runner::new(target.store(), target.open(v1, false).await);
    active.catch_up(u64::MAX).await.unwrap();
    let v2 = Counts {
        skip: Some("Shipped"),
        ..version(2)
    };
    let mut rebuild = Runner::new(target.store(), target.open(v2, true).await);
    rebuild.catch_up(u64::MAX).await.unwrap();
    let report = rebuild.sink_mut().diff(5).await.unwrap();
    assert_eq!((report.active, report.candidate), (Some(1), 2));
    assert!(!report.is_empty());
    let [table] = &report.tables[..] else {
        panic!("one table: {report:?}")
    };
    assert_eq!(table.table, "counts");
    assert_eq!((table.added, table.removed, table.changed), (1, 1, 1));
    assert_eq!(
        table.added_samples,
        vec![json!({"event_type": "Paid", "n": 666})]
    );
    assert_eq!(
        table.removed_samples,
        vec![json!({"event_type": "Shipped", "n": 333})]
    );
    assert_eq!(
        table.changed_samples,
        vec![(
            json!({"event_type": "Placed", "n": 333}),
            json!({"event_type": "Placed", "n": 666})
        )]
    );
    // Reviewing changes nothing: version 1 still serves.
    let (counts, _) = T::read_model(active.sink_mut()).await;
    assert_eq!(counts.get("Shipped"), Some(&333));
    // The same projection again differs in nothing.
    let same = Counts {
        skip: Some("Paid"),
        weight: 1,
        ..version(3)
    };
    let mut again = Runner::new(target.store(), target.open(same, true).await);
    again.catch_up(u64::MAX).await.unwrap();
    assert!(again.sink_mut().diff(5).await.unwrap().is_empty());
}

/// Blue/green (P4, P5): version 2 is built beside version 1, which keeps
/// serving reads (and following appends) until the swap; the swap re-points
/// the views at once and drops version 1, whose runner then stops.
async fn rebuild_builds_beside_the_active_version_and_swaps<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 900).await;
    let mut v1 = Runner::new(target.store(), target.sink(None).await);
    v1.catch_up(u64::MAX).await.unwrap();

    let mut v2 = Runner::new(target.store(), target.open(version(2), true).await);
    v2.catch_up(600).await.unwrap();
    // Version 1 still serves, and keeps following the log.
    append(&target.store(), 300).await;
    v1.catch_up(u64::MAX).await.unwrap();
    let mut v1_sink = v1.into_sink();
    assert_eq!(
        T::read_model(&mut v1_sink).await,
        (expected_counts(1200), 1200)
    );

    v2.catch_up(u64::MAX).await.unwrap();
    let previous = v2.sink_mut().swap(false).await.unwrap();
    assert_eq!(previous, Some(1));
    let mut v2_sink = v2.into_sink();
    let (counts, checkpoint) = T::read_model(&mut v2_sink).await;
    assert_eq!((counts, checkpoint), (doubled(expected_counts(1200)), 1200));
    assert!(T::has_table(&mut v2_sink, "counts_v2").await);
    assert!(
        !T::has_table(&mut v2_sink, "counts_v1").await,
        "version 1 is dropped"
    );

    // The old version's runner stops instead of writing.
    append(&target.store(), 30).await;
    let mut v1 = Runner::new(target.store(), v1_sink);
    match v1.catch_up(u64::MAX).await {
        Err(ProjectionError::NotActive {
            version: 1,
            active: 2,
            ..
        }) => {}
        other => panic!("expected version 1 to stop, got {other:?}"),
    }
    // Version 2 goes on live from its checkpoint.
    let mut v2 = Runner::new(target.store(), target.open(version(2), false).await);
    assert_eq!(v2.catch_up(u64::MAX).await.unwrap().events, 30);
    let (counts, _) = T::read_model(&mut v2.into_sink()).await;
    assert_eq!(counts, doubled(expected_counts(1230)));
}

/// P6: a rebuild stopped part-way leaves version 1 as it was; it resumes
/// from its own checkpoint, or is discarded. A swap can keep version 1.
async fn stopped_rebuild_resumes_or_is_discarded_and_swaps_may_keep_the_old_version<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 999).await;
    let mut v1 = Runner::new(target.store(), target.sink(None).await);
    v1.catch_up(u64::MAX).await.unwrap();
    // Stopped at 400 (a cancel or a crash).
    let mut rebuild = Runner::new(target.store(), target.open(version(2), true).await);
    rebuild.catch_up(400).await.unwrap();
    drop(rebuild);
    let mut v1_sink = v1.into_sink();
    assert_eq!(
        T::read_model(&mut v1_sink).await,
        (expected_counts(999), 999)
    );

    let mut resumed = Runner::new(target.store(), target.open(version(2), true).await);
    let stats = resumed.catch_up(u64::MAX).await.unwrap();
    assert_eq!(stats.events, 599, "it resumed at its own checkpoint");
    resumed.sink_mut().discard().await.unwrap();
    let mut discarded = resumed.into_sink();
    assert!(!T::has_table(&mut discarded, "counts_v2").await);
    assert_eq!(
        T::read_model(&mut v1_sink).await,
        (expected_counts(999), 999)
    );

    // Built again from scratch, swapped in keeping version 1.
    let mut again = Runner::new(target.store(), target.open(version(2), true).await);
    assert_eq!(again.catch_up(u64::MAX).await.unwrap().events, 999);
    assert_eq!(again.sink_mut().swap(true).await.unwrap(), Some(1));
    let mut v2_sink = again.into_sink();
    assert!(
        T::has_table(&mut v2_sink, "counts_v1").await,
        "kept on request"
    );
    let (counts, _) = T::read_model(&mut v2_sink).await;
    assert_eq!(counts, doubled(expected_counts(999)));
    // The active version cannot be discarded.
    assert!(v2_sink.discard().await.is_err());
}

/// P5: a rate-limited rebuild applies at most the rate on average, in
/// batches of a tenth of a second's worth, and reports its progress.
async fn rebuilds_can_be_rate_limited_and_report_progress<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 900).await;
    let mut rebuild =
        Runner::new(target.store(), target.open(version(1), false).await).with_rate_limit(3000);
    let status = rebuild.status();
    assert_eq!(status.progress(), None, "no catch-up yet");
    let started = std::time::Instant::now();
    let watcher = {
        let status = status.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen
                .last()
                .is_none_or(|p: &factline_projections::Progress| p.done < p.total)
            {
                if let Some(progress) = status.progress() {
                    seen.push(progress);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    let stats = rebuild.catch_up(u64::MAX).await.unwrap();
    // A lower bound only: a slow machine makes it longer, never shorter.
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "900 events at 3000/s took {:?}",
        started.elapsed()
    );
    assert!(stats.largest_batch <= 300, "{stats:?}");
    let seen = watcher.await.unwrap();
    assert!(seen.iter().all(|p| p.total == 900));
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
    let last = seen.last().unwrap();
    assert_eq!(last.done, 900);
    assert!(seen
        .iter()
        .any(|p| p.done > 0 && p.done < 900 && p.eta.is_some()));
}

macro_rules! on_every_target {
    ($($case:ident),* $(,)?) => {
        on_every_target!(@in sqlite_same_file, super::Sqlite<true>; $($case),*);
        on_every_target!(@in sqlite_other_file, super::Sqlite<false>; $($case),*);
        on_every_target!(@in postgres_same_database, super::Postgres<true>; $($case),*);
        on_every_target!(@in postgres_other_database, super::Postgres<false>; $($case),*);
    };
    (@in $module:ident, $target:ty; $($case:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case::<$target>().await;
                }
            )*
        }
    };
}

on_every_target!(
    catches_up_in_batches_with_the_checkpoint,
    a_poison_event_stops_the_projection_and_resuming_applies_each_event_once,
    poison_events_are_parked_with_their_stream_held_back,
    skipped_events_release_their_stream_on_retry,
    follows_live_appends_until_stopped,
    pause_holds_batches_back_until_resumed,
    a_second_runner_cannot_apply_events_the_first_applied,
    lag_counts_events_and_seconds_behind,
    reads_wait_for_the_position_of_a_write,
    rebuild_builds_beside_the_active_version_and_swaps,
    stopped_rebuild_resumes_or_is_discarded_and_swaps_may_keep_the_old_version,
    rebuilds_can_be_rate_limited_and_report_progress,
    diff_reports_what_a_swap_would_change,
);

/// A read model that cannot be opened is a database failure with the
/// system's error as its source, not retryable; a bad partition count is
/// a refusal of the request, not a database failure.
#[test]
fn read_model_failures_keep_their_source_and_refusals_are_told_apart() {
    use std::error::Error as _;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let Err(failed) = SqliteSink::open(file.join("read.db"), version(1)) else {
        panic!("a read model under a plain file cannot be created");
    };
    assert!(
        matches!(&failed, ProjectionError::ReadModel { projection, .. } if projection == "counts"),
        "{failed:?}"
    );
    assert!(!failed.is_retryable());
    let source = failed.source().expect("the storage error");
    assert!(
        source.source().is_some(),
        "and the system's error under it: {failed:?}"
    );

    let invalid = factline_projections::Partition::new(3, 2);
    assert!(
        matches!(invalid, Err(ProjectionError::Invalid { .. })),
        "{invalid:?}"
    );
    assert!(!invalid.unwrap_err().is_retryable());
}
