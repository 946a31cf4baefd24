//! Lookups remembered between batches: a read model whose lookup table is
//! written by inserts alone resolves its lookups in memory, and still ends
//! up equal to a fold of the same events on SQLite and PostgreSQL when
//! batches are cut short by events it parks, when a key is inserted twice,
//! when a lookup runs before its row exists, and when a run resumes from a
//! checkpoint other than 0.

use std::collections::BTreeMap;
use std::sync::Arc;

use factline_core::{EventData, EventStore, ExpectedVersion, InMemoryStore, StreamId};
use factline_projections::{
    PoisonPolicy, Portable, PostgresAdmin, PostgresSink, RetryPolicy, Runner, Sink, SqliteAdmin,
    SqliteSink,
};
use factline_read_models::{DeclaredProjection, Definitions};
use serde_json::json;

const PARCELS: &str = r#"
[[read_model]]
name = "parcels"
version = 1

[read_model.tables.parcel_hubs]
columns = { parcel_id = "text", hub = "text" }
key = ["parcel_id"]

[read_model.tables.hub_weights]
columns = { hub = "text", grams = "integer", parcels = "integer" }
key = ["hub"]

[read_model.tables.hub_inspections]
columns = { hub = "text", inspections = "integer" }
key = ["hub"]

# A parcel's own events find its hub by the stream; the scales' by the
# parcel their data names.
[read_model.lookups.hub]
table = "parcel_hubs"
key = { parcel_id = "entity_id" }
column = "hub"

[read_model.lookups.weighed_hub]
table = "parcel_hubs"
key = { parcel_id = "data.parcel" }
column = "hub"

[[read_model.on.ParcelRegistered]]
insert = "parcel_hubs"
if_exists = "ignore"
values = { parcel_id = "entity_id", hub = "data.hub" }

# Inspecting a parcel not registered is an error: the event is parked and
# its stream held back, registration included.
[[read_model.on.ParcelInspected]]
upsert = "hub_inspections"
key = { hub = "lookup.hub" }
add = { inspections = 1 }

[[read_model.on.ParcelWeighed]]
upsert = "hub_weights"
key = { hub = "lookup.weighed_hub" }
add = { grams = "data.grams", parcels = 1 }
if_missing = "skip"
"#;

fn projection() -> Portable<DeclaredProjection> {
    let definitions = Definitions::parse(PARCELS, "parcels.toml").unwrap();
    Portable::new(definitions.projection("parcels").unwrap())
}

/// What the read model must hold, and the positions it must park.
#[derive(Debug, Default)]
struct Fold {
    /// Per hub: grams and parcels weighed, inspections.
    hubs: BTreeMap<String, (i64, i64, i64)>,
    parked: Vec<u64>,
}

/// Parcels' events and scales' weighings interleaved: some parcels
/// inspected before they are registered (parked, and their registration
/// held back behind it), some registered twice with another hub (the first
/// stays), some registered without a hub (parked); weighings of parcels
/// not (or not yet) registered count for nothing.
async fn history(store: &Arc<dyn EventStore>, failures: bool) -> Fold {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut queues: Vec<(String, Vec<EventData>)> = Vec::new();
    let weighed = |parcel: u32, grams: u32| {
        EventData::new(
            "ParcelWeighed",
            json!({ "parcel": parcel.to_string(), "grams": grams }),
        )
    };
    for i in 0..80 {
        let mut events = Vec::new();
        if failures && i % 23 == 3 {
            events.push(EventData::new("ParcelInspected", json!({})));
        }
        let hub = format!("hub-{}", rng.u32(0..4));
        events.push(match failures && i % 29 == 4 {
            true => EventData::new("ParcelRegistered", json!({ "hub_name": hub })),
            false => EventData::new("ParcelRegistered", json!({ "hub": hub })),
        });
        for _ in 0..rng.usize(0..3) {
            events.push(EventData::new("ParcelInspected", json!({})));
        }
        if i % 5 == 2 {
            events.push(EventData::new(
                "ParcelRegistered",
                json!({ "hub": "hub-late" }),
            ));
        }
        queues.push((format!("Parcel-{i}"), events));
    }
    for scale in 0..6 {
        let weighings = (0..60).map(|_| weighed(rng.u32(0..80), rng.u32(100..900)));
        queues.push((format!("Scale-{scale}"), weighings.collect()));
    }
    let mut fold = Fold::default();
    let mut hubs: BTreeMap<String, String> = BTreeMap::new();
    let mut held: Vec<String> = Vec::new();
    // Last, every parcel is weighed once more: those held back count for
    // nothing.
    let last_round = (0..80).map(|parcel| weighed(parcel, 1_000)).collect();
    let mut last = Some(("Scale-last".to_owned(), last_round));
    loop {
        let mut waiting: Vec<usize> = (0..queues.len())
            .filter(|q| !queues[*q].1.is_empty())
            .collect();
        if waiting.is_empty() {
            match last.take() {
                Some(round) => {
                    queues.push(round);
                    waiting.push(queues.len() - 1);
                }
                None => break,
            }
        }
        let (stream, events) = &mut queues[waiting[rng.usize(..waiting.len())]];
        let event = events.remove(0);
        let appended = store
            .append(
                &StreamId::new(stream.clone()).unwrap(),
                ExpectedVersion::Any,
                vec![event.clone()],
            )
            .await
            .unwrap();
        let position = appended.first_position;
        if held.contains(stream) {
            fold.parked.push(position);
            continue;
        }
        let parcel = stream
            .strip_prefix("Parcel-")
            .unwrap_or_default()
            .to_owned();
        let data: serde_json::Value = event.data.to_value().unwrap();
        match (event.event_type.as_str(), data["hub"].as_str()) {
            ("ParcelRegistered", Some(hub)) => {
                hubs.entry(parcel).or_insert_with(|| hub.to_owned());
            }
            ("ParcelInspected", _) if hubs.contains_key(&parcel) => {
                fold.hubs.entry(hubs[&parcel].clone()).or_default().2 += 1;
            }
            ("ParcelRegistered" | "ParcelInspected", _) => {
                fold.parked.push(position);
                held.push(stream.clone());
            }
            _ => {
                if let Some(hub) = hubs.get(data["parcel"].as_str().unwrap()) {
                    let h = fold.hubs.entry(hub.clone()).or_default();
                    h.0 += data["grams"].as_i64().unwrap();
                    h.1 += 1;
                }
            }
        }
    }
    fold
}

/// Applies the history up to `to` with a sink of its own (a new process,
/// as it were), parking what it cannot apply.
async fn run_to<S: Sink>(store: &Arc<dyn EventStore>, sink: S, to: u64) {
    let mut runner = Runner::new(store.clone(), sink)
        .with_retries(RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        })
        .with_poison_policy(PoisonPolicy::Park);
    runner.catch_up(to).await.unwrap();
}

fn expected(fold: &Fold) -> Vec<(String, i64, i64, i64)> {
    fold.hubs
        .iter()
        .map(|(hub, (grams, parcels, inspections))| (hub.clone(), *grams, *parcels, *inspections))
        .collect()
}

/// Every hub with its weighings and inspections (none when it has none).
const HUBS: &str = "SELECT h.hub, CAST(coalesce(w.grams, 0) AS BIGINT), CAST(coalesce(w.parcels, 0) AS BIGINT),
        CAST(coalesce(i.inspections, 0) AS BIGINT)
    FROM (SELECT hub FROM {s}hub_weights UNION SELECT hub FROM {s}hub_inspections) AS h
    LEFT JOIN {s}hub_weights AS w ON w.hub = h.hub LEFT JOIN {s}hub_inspections AS i ON i.hub = h.hub
    ORDER BY h.hub";

#[tokio::test]
async fn cached_lookups_on_sqlite_equal_the_fold_across_parked_events_and_a_resumed_run() {
    for failures in [true, false] {
        let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
        let fold = history(&store, failures).await;
        assert_eq!(fold.parked.len() > 5, failures, "{fold:?}");
        assert!(fold.hubs.len() > 2, "{fold:?}");
        on_sqlite(&store, &fold).await;
    }
}

async fn on_sqlite(store: &Arc<dyn EventStore>, fold: &Fold) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("read.db");
    let head = store.head_position().await.unwrap();
    run_to(
        store,
        SqliteSink::open(&path, projection()).unwrap(),
        head / 5,
    )
    .await;
    run_to(store, SqliteSink::open(&path, projection()).unwrap(), head).await;

    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut stmt = conn.prepare(&HUBS.replace("{s}", "")).unwrap();
    let rows: Vec<(String, i64, i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, expected(fold));
    let parked = SqliteAdmin::open(&path)
        .unwrap()
        .parked("parcels")
        .await
        .unwrap();
    let positions: Vec<u64> = parked.iter().map(|p| p.position).collect();
    assert_eq!(positions, fold.parked);
}

#[tokio::test]
async fn cached_lookups_on_postgres_equal_the_fold_across_parked_events_and_a_resumed_run() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let fold = history(&store, true).await;
    let db = factline_testkit::pg::database().await;
    let head = store.head_position().await.unwrap();
    for to in [head / 5, head] {
        let sink = PostgresSink::connect(&db.url, "parcels_read", projection())
            .await
            .unwrap();
        run_to(&store, sink, to).await;
    }

    let client = factline_testkit::pg::connect(&db.url).await;
    let rows: Vec<(String, i64, i64, i64)> = client
        .query(&HUBS.replace("{s}", "parcels_read."), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(rows, expected(&fold));
    let admin = PostgresAdmin::connect(&db.url, "parcels_read")
        .await
        .unwrap();
    let parked = admin.parked("parcels").await.unwrap();
    let positions: Vec<u64> = parked.iter().map(|p| p.position).collect();
    assert_eq!(positions, fold.parked);
}
