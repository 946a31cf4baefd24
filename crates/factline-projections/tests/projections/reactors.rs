//! Reactors (P7) on SQLite and PostgreSQL checkpoints: live events only,
//! no repeat after a clean restart, and after a crash between an effect
//! and its checkpoint the effect runs again with the same idempotency key.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use factline_core::{EventData, EventStore, ExpectedVersion, RecordedEvent, StreamId};
use factline_projections::{
    effect_key, ApplyError, Checkpoints, PostgresCheckpoints, ProjectionError, Reactor,
    ReactorRunner, SqliteCheckpoints,
};
use serde_json::json;

/// Records each effect as (position, key).
#[derive(Clone, Default)]
struct Mailer {
    sent: Arc<Mutex<Vec<(u64, String)>>>,
}

#[async_trait]
impl Reactor for Mailer {
    fn name(&self) -> &str {
        "mailer"
    }
    async fn react(&self, event: &RecordedEvent, key: &str) -> Result<(), ApplyError> {
        self.sent
            .lock()
            .unwrap()
            .push((event.position, key.to_owned()));
        Ok(())
    }
}

/// Checkpoints that fail to save `fail_at` once: the process "dies" right
/// after that effect.
struct Flaky {
    inner: Box<dyn Checkpoints>,
    fail_at: Mutex<Option<u64>>,
}

#[async_trait]
impl Checkpoints for Flaky {
    async fn load(&self, name: &str) -> Result<Option<u64>, ProjectionError> {
        self.inner.load(name).await
    }
    async fn save(&self, name: &str, position: u64) -> Result<(), ProjectionError> {
        let dies = {
            let mut fail_at = self.fail_at.lock().unwrap();
            let dies = *fail_at == Some(position);
            if dies {
                *fail_at = None;
            }
            dies
        };
        if dies {
            return Err(ProjectionError::read_model(
                name,
                factline_core::StorageError::new("the process died"),
            ));
        }
        self.inner.save(name, position).await
    }
}

async fn append(store: &Arc<dyn EventStore>, n: usize) {
    let events = (0..n)
        .map(|i| EventData::new("Placed", json!({ "i": i })))
        .collect();
    let stream = StreamId::new("Order-r").unwrap();
    store
        .append(&stream, ExpectedVersion::Any, events)
        .await
        .unwrap();
}

/// Runs the reactor until its checkpoint reaches `until` (or it fails);
/// once it has started (its checkpoint is `started_at`), appends
/// `then_append` events.
async fn react_until(
    store: &Arc<dyn EventStore>,
    mailer: &Mailer,
    checkpoints: Flaky,
    (started_at, then_append): (u64, usize),
    until: u64,
) -> Result<(), ProjectionError> {
    let mut runner = ReactorRunner::new(store.clone(), mailer.clone(), checkpoints);
    let mut progress = runner.watch_checkpoint();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { runner.run(stopped).await });
    if then_append > 0 {
        let started = tokio::time::timeout(
            Duration::from_secs(30),
            progress.wait_for(|p| *p >= started_at),
        )
        .await;
        assert!(matches!(started, Ok(Ok(_))), "the reactor did not start");
        append(store, then_append).await;
    }
    let reached = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if *progress.borrow_and_update() >= until {
                return true;
            }
            if progress.changed().await.is_err() {
                return false;
            }
        }
    })
    .await
    .unwrap_or(false);
    stop.send_replace(true);
    let outcome = running.await.unwrap();
    assert!(
        reached || outcome.is_err(),
        "the reactor neither reached {until} nor failed"
    );
    outcome
}

async fn reactors_see_live_events_once_and_repeat_only_an_unsaved_effect(
    store: Arc<dyn EventStore>,
    checkpoints: impl Fn() -> futures_checkpoints::Pending,
) {
    append(&store, 100).await;
    let mailer = Mailer::default();
    let flaky = |fail_at| {
        let pending = checkpoints();
        async move {
            Flaky {
                inner: pending.await,
                fail_at: Mutex::new(fail_at),
            }
        }
    };
    // A new reactor starts at the head: the 100 past events are not its.
    react_until(&store, &mailer, flaky(None).await, (100, 20), 120)
        .await
        .unwrap();
    let sent = mailer.sent.lock().unwrap().clone();
    let positions: Vec<u64> = sent.iter().map(|(p, _)| *p).collect();
    assert_eq!(positions, (101..=120).collect::<Vec<_>>());
    let events = store.read_all(101, 20).await.unwrap();
    for ((_, key), event) in sent.iter().zip(&events) {
        assert_eq!(key, &effect_key("mailer", event));
    }

    // Appended while it was stopped: reacted to after the restart, and
    // nothing before them again.
    append(&store, 5).await;
    react_until(&store, &mailer, flaky(None).await, (0, 0), 125)
        .await
        .unwrap();
    assert_eq!(mailer.sent.lock().unwrap().len(), 25);

    // The process dies after the effect of 126, before its checkpoint.
    append(&store, 3).await;
    let died = react_until(&store, &mailer, flaky(Some(126)).await, (0, 0), 128).await;
    assert!(died.is_err());
    react_until(&store, &mailer, flaky(None).await, (0, 0), 128)
        .await
        .unwrap();
    let sent = mailer.sent.lock().unwrap().clone();
    let positions: Vec<u64> = sent[25..].iter().map(|(p, _)| *p).collect();
    assert_eq!(
        positions,
        vec![126, 126, 127, 128],
        "only the unsaved effect repeats"
    );
    assert_eq!(sent[25].1, sent[26].1, "with the same idempotency key");
}

/// Boxed checkpoint stores made on demand (one per run, as after a restart).
mod futures_checkpoints {
    use std::future::Future;
    use std::pin::Pin;

    use factline_projections::Checkpoints;

    pub type Pending = Pin<Box<dyn Future<Output = Box<dyn Checkpoints>> + Send>>;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_reactors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store: Arc<dyn EventStore> = Arc::new(factline_sqlite::SqliteStore::open(&path).unwrap());
    reactors_see_live_events_once_and_repeat_only_an_unsaved_effect(store, move || {
        let path = path.clone();
        Box::pin(async move {
            Box::new(SqliteCheckpoints::open(&path).unwrap()) as Box<dyn Checkpoints>
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_reactors() {
    let db = factline_testkit::pg::database().await;
    let store: Arc<dyn EventStore> = Arc::new(
        factline_postgres::PostgresStore::connect(&db.url)
            .await
            .unwrap(),
    );
    let url = db.url.clone();
    reactors_see_live_events_once_and_repeat_only_an_unsaved_effect(store, move || {
        let url = url.clone();
        Box::pin(async move {
            Box::new(PostgresCheckpoints::connect(&url, "read").await.unwrap())
                as Box<dyn Checkpoints>
        })
    })
    .await;
}
