//! A process running a projection killed with SIGKILL at random points
//! resumes from its checkpoint: after many kills the read model holds every
//! event exactly once. The test binary re-runs itself as the child.

use factline_testkit::process::KillPlan;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use factline_core::{EventData, EventStore, ExpectedVersion, RecordedEvent, StreamId};
use factline_projections::{
    ApplyError, BatchPolicy, PostgresProjection, PostgresSink, Runner, Sink, SqliteProjection,
    SqliteSink, Tables,
};
use serde_json::json;

const CHILD: &str = "FACTLINE_TEST_PROJECTION_CHILD";
const EVENTS: u64 = 20_000;
const KILLS: usize = 8;

/// Sums `data.k` per event type: a double-applied event shows in the sum.
struct Sums;

impl SqliteProjection for Sums {
    fn name(&self) -> &str {
        "sums"
    }
    fn tables(&self) -> &[&str] {
        &["sums"]
    }
    fn setup(&mut self, tx: &rusqlite::Transaction<'_>, tables: &Tables) -> rusqlite::Result<()> {
        tx.execute(
            &format!(
                "CREATE TABLE IF NOT EXISTS {} (event_type TEXT PRIMARY KEY, total INTEGER NOT NULL, n INTEGER NOT NULL)",
                tables.get("sums")
            ),
            [],
        )
        .map(|_| ())
    }
    fn apply(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        tables: &Tables,
        e: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        tx.execute(
            &format!(
                "INSERT INTO {} VALUES (?1, ?2, 1)
                 ON CONFLICT (event_type) DO UPDATE SET total = total + excluded.total, n = n + 1",
                tables.get("sums")
            ),
            rusqlite::params![
                e.event_type,
                e.data.to_value().unwrap()["k"].as_i64().unwrap_or(0)
            ],
        )?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl PostgresProjection for Sums {
    fn name(&self) -> &str {
        "sums"
    }
    fn tables(&self) -> &[&str] {
        &["sums"]
    }
    async fn setup(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &Tables,
    ) -> Result<(), tokio_postgres::Error> {
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (event_type text PRIMARY KEY, total bigint NOT NULL, n bigint NOT NULL)",
            tables.get("sums")
        ))
        .await
    }
    async fn apply(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &Tables,
        e: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        tx.execute(
            &format!(
                "INSERT INTO {} AS s VALUES ($1, $2, 1)
                 ON CONFLICT (event_type) DO UPDATE SET total = s.total + excluded.total, n = s.n + 1",
                tables.get("sums")
            ),
            &[&e.event_type, &e.data.to_value().unwrap()["k"].as_i64().unwrap_or(0)],
        )
        .await?;
        Ok(())
    }
}

fn expected() -> BTreeMap<String, (i64, i64)> {
    let mut sums = BTreeMap::new();
    for k in 0..EVENTS as i64 {
        let entry = sums.entry(format!("T{}", k % 5)).or_insert((0, 0));
        entry.0 += k;
        entry.1 += 1;
    }
    sums
}

async fn fill(store: &Arc<dyn EventStore>) {
    for chunk in 0..EVENTS / 500 {
        let events = (chunk * 500..chunk * 500 + 500)
            .map(|k| EventData::new(format!("T{}", k % 5), json!({ "k": k })))
            .collect();
        let stream = StreamId::new(format!("Load-{}", chunk % 11)).unwrap();
        store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
}

/// Small batches: many commits for the kills to land between and in.
fn policy() -> BatchPolicy {
    BatchPolicy {
        max_events: 40,
        max_wait: Duration::from_millis(100),
    }
}

/// The child: catches up, printing its checkpoint after every batch.
async fn run_to_the_end<S: Sink + 'static>(store: Arc<dyn EventStore>, sink: S) {
    let mut runner = Runner::new(store, sink).with_policy(policy());
    let mut progress = runner.watch_checkpoint();
    tokio::spawn(async move {
        while progress.changed().await.is_ok() {
            let at = *progress.borrow_and_update();
            println!("at {at}");
        }
    });
    runner.catch_up(u64::MAX).await.unwrap();
    println!("done");
}

#[test]
fn sqlite_projection_killed_repeatedly_applies_every_event_once() {
    const TEST: &str = "sqlite_projection_killed_repeatedly_applies_every_event_once";
    if let Ok(dir) = std::env::var(CHILD) {
        factline_testkit::runtime().block_on(async {
            let path = std::path::Path::new(&dir).join("events.db");
            let store = Arc::new(factline_sqlite::SqliteStore::open(&path).unwrap());
            run_to_the_end(store, SqliteSink::open(&path, Sums).unwrap()).await;
        });
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    factline_testkit::runtime().block_on(async {
        let store: Arc<dyn EventStore> =
            Arc::new(factline_sqlite::SqliteStore::open(&path).unwrap());
        fill(&store).await;
    });
    kill_repeatedly(
        &factline_testkit::process::test_name(module_path!(), TEST),
        &[(CHILD, dir.path().display().to_string())],
    );
    factline_testkit::runtime().block_on(async {
        let mut sink = SqliteSink::open(&path, Sums).unwrap();
        assert_eq!(sink.checkpoint().await.unwrap(), EVENTS);
        let sums: BTreeMap<String, (i64, i64)> = sink
            .query(|conn| {
                let mut stmt = conn.prepare("SELECT event_type, total, n FROM sums")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?;
                rows.collect()
            })
            .await
            .unwrap();
        assert_eq!(sums, expected());
    });
}

#[test]
fn postgres_projection_killed_repeatedly_applies_every_event_once() {
    const TEST: &str = "postgres_projection_killed_repeatedly_applies_every_event_once";
    if let Ok(url) = std::env::var(CHILD) {
        factline_testkit::runtime().block_on(async {
            let store = factline_postgres::PostgresStore::connect(&url)
                .await
                .unwrap();
            let sink = PostgresSink::connect(&url, "read", Sums).await.unwrap();
            run_to_the_end(Arc::new(store), sink).await;
        });
        return;
    }
    let rt = factline_testkit::runtime();
    let db = rt.block_on(factline_testkit::pg::database());
    rt.block_on(async {
        let store: Arc<dyn EventStore> = Arc::new(
            factline_postgres::PostgresStore::connect(&db.url)
                .await
                .unwrap(),
        );
        fill(&store).await;
    });
    kill_repeatedly(
        &factline_testkit::process::test_name(module_path!(), TEST),
        &[(CHILD, db.url.clone())],
    );
    rt.block_on(async {
        let mut sink = PostgresSink::connect(&db.url, "read", Sums).await.unwrap();
        assert_eq!(sink.checkpoint().await.unwrap(), EVENTS);
        let rows = sink
            .client()
            .query("SELECT event_type, total, n FROM read.sums", &[])
            .await
            .unwrap();
        let sums: BTreeMap<String, (i64, i64)> = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        assert_eq!(sums, expected());
    });
}

/// Runs the child until it finishes by itself, first killing it `KILLS`
/// times, each after a random number of its batches (so at a random point
/// of a later batch, whatever the machine's speed).
fn kill_repeatedly(test: &str, env: &[(&str, String)]) {
    let plan = KillPlan {
        kills: KILLS,
        seed: 11,
        after: 1..40,
        pause_ms: 0..1,
    };
    plan.run(test, env, |line| line.starts_with("at "));
}
