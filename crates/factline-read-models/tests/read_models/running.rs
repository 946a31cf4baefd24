//! A declared read model runs on the engine's runner on SQLite and on
//! PostgreSQL and ends up equal to a fold of the same events; events it
//! cannot apply are parked with a message naming the event and the rule.

use std::collections::BTreeMap;
use std::sync::Arc;

use factline_core::{EventData, EventStore, ExpectedVersion, InMemoryStore, StreamId};
use factline_projections::{
    PoisonPolicy, Portable, PostgresAdmin, PostgresSink, RetryPolicy, Runner, Sink, SqliteAdmin,
    SqliteSink,
};
use factline_read_models::{DeclaredProjection, Definitions};
use serde_json::json;

const INVOICES: &str = factline_testkit::fixtures::INVOICES_READ_MODELS;

pub(crate) fn projection() -> Portable<DeclaredProjection> {
    let definitions = Definitions::parse(INVOICES, "invoices.toml").unwrap();
    Portable::new(definitions.projection("invoices").unwrap())
}

/// (customer, total, paid, status, lines, last position, note)
pub(crate) type InvoiceRow = (String, i64, i64, String, i64, i64, Option<String>);

/// What the invoices read model must hold, folded from the same history.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    pub(crate) invoices: BTreeMap<String, InvoiceRow>,
    customers: BTreeMap<String, String>,
    /// (customer, day) → (cents, payments, largest, smallest)
    revenue: BTreeMap<(String, String), (i64, i64, i64, i64)>,
    /// Positions of the events that must be parked.
    parked: Vec<u64>,
}

/// Appends a varied history of invoices and folds it: issues with notes or
/// without, partial and full payments, voids (some of test invoices, which
/// stay), and payments of invoices never issued (which cannot find their
/// customer and are parked).
pub(crate) async fn history(store: &Arc<dyn EventStore>) -> Fold {
    let mut fold = Fold::default();
    let mut rng = fastrand::Rng::with_seed(7);
    for i in 0..60 {
        let id = format!("2026-{i:04}");
        let stream = StreamId::new(format!("Invoice-{id}")).unwrap();
        let customer = format!("c{}", rng.u32(0..6));
        let total = i64::from(rng.u32(1..50)) * 100;
        let lines = rng.usize(1..4);
        let mut events = Vec::new();
        let orphan = i % 13 == 5;
        if !orphan {
            let note = (i % 3 == 0).then(|| format!("note {i}"));
            events.push(EventData::new(
                "InvoiceIssued",
                json!({ "customer": customer, "total_cents": total, "lines": vec![json!({}); lines], "note": note }),
            ));
        }
        for _ in 0..rng.usize(0..4) {
            events.push(EventData::new(
                "PaymentReceived",
                json!({ "cents": i64::from(rng.u32(1..30)) * 100 }),
            ));
        }
        let void = !orphan && i % 7 == 0;
        let test_invoice = i % 14 == 0;
        if void {
            events.push(EventData::new(
                "InvoiceVoided",
                json!({ "reason": if test_invoice { "test" } else { "mistake" } }),
            ));
        }
        if events.is_empty() {
            continue;
        }
        let appended = store
            .append(&stream, ExpectedVersion::NoStream, events.clone())
            .await
            .unwrap();
        let first = appended.first_position;
        for (n, event) in events.iter().enumerate() {
            let position = first + n as u64;
            let data: serde_json::Value = event.data.to_value().unwrap();
            match event.event_type.as_str() {
                "InvoiceIssued" => {
                    fold.customers.insert(id.clone(), customer.clone());
                    let note = data["note"].as_str().map(str::to_owned);
                    fold.invoices.insert(
                        id.clone(),
                        (
                            customer.clone(),
                            total,
                            0,
                            "open".into(),
                            lines as i64,
                            position as i64,
                            note,
                        ),
                    );
                }
                "PaymentReceived" if orphan => fold.parked.push(position),
                "PaymentReceived" => {
                    let cents = data["cents"].as_i64().unwrap();
                    let row = fold.invoices.get_mut(&id).unwrap();
                    row.2 += cents;
                    row.5 = position as i64;
                    if row.2 >= row.1 {
                        row.3 = "paid".into();
                    }
                    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
                    let r = fold.revenue.entry((customer.clone(), day)).or_insert((
                        0,
                        0,
                        i64::MIN,
                        i64::MAX,
                    ));
                    *r = (r.0 + cents, r.1 + 1, r.2.max(cents), r.3.min(cents));
                }
                "InvoiceVoided" if !test_invoice => {
                    fold.invoices.remove(&id);
                }
                _ => {}
            }
        }
    }
    fold
}

type Rows = Vec<Vec<Option<String>>>;

const INVOICE_ROWS: &str = "SELECT invoice_id, customer, CAST(total_cents AS TEXT), CAST(paid_cents AS TEXT), status,
        CAST(lines AS TEXT), CAST(last_position AS TEXT), note FROM {s}invoices ORDER BY invoice_id";
const REVENUE_ROWS: &str =
    "SELECT customer, day, CAST(cents AS TEXT), CAST(payments AS TEXT), CAST(largest AS TEXT),
        CAST(smallest AS TEXT) FROM {s}revenue_per_day ORDER BY customer, day";

fn expected(fold: &Fold) -> (Rows, Rows) {
    let invoices = fold
        .invoices
        .iter()
        .map(|(id, (customer, total, paid, status, lines, last, note))| {
            vec![
                Some(id.clone()),
                Some(customer.clone()),
                Some(total.to_string()),
                Some(paid.to_string()),
                Some(status.clone()),
                Some(lines.to_string()),
                Some(last.to_string()),
                note.clone(),
            ]
        })
        .collect();
    let revenue = fold
        .revenue
        .iter()
        .map(|((customer, day), (cents, payments, largest, smallest))| {
            [
                customer.clone(),
                day.clone(),
                cents.to_string(),
                payments.to_string(),
                largest.to_string(),
                smallest.to_string(),
            ]
            .into_iter()
            .map(Some)
            .collect()
        })
        .collect();
    (invoices, revenue)
}

pub(crate) async fn run<S: Sink>(store: &Arc<dyn EventStore>, sink: S) {
    let mut runner = Runner::new(store.clone(), sink)
        .with_retries(RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        })
        .with_poison_policy(PoisonPolicy::Park);
    runner
        .catch_up(store.head_position().await.unwrap())
        .await
        .unwrap();
}

fn sqlite_rows(path: &std::path::Path, sql: &str) -> Rows {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn.prepare(&sql.replace("{s}", "")).unwrap();
    let width = stmt.column_count();
    stmt.query_map([], |r| {
        (0..width).map(|i| r.get::<_, Option<String>>(i)).collect()
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[tokio::test]
async fn a_declared_read_model_on_sqlite_equals_the_fold_and_parks_what_it_cannot_apply() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let fold = history(&store).await;
    assert!(!fold.parked.is_empty() && !fold.revenue.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("read.db");
    run(&store, SqliteSink::open(&path, projection()).unwrap()).await;

    let (invoices, revenue) = expected(&fold);
    assert_eq!(sqlite_rows(&path, INVOICE_ROWS), invoices);
    assert_eq!(sqlite_rows(&path, REVENUE_ROWS), revenue);
    let parked = SqliteAdmin::open(&path)
        .unwrap()
        .parked("invoices")
        .await
        .unwrap();
    let positions: Vec<u64> = parked.iter().map(|p| p.position).collect();
    assert_eq!(positions, fold.parked);
    assert_first_refusal_is_named(&parked);
}

/// The first payment of an invoice never issued is refused by the
/// update, the first operation of its type, naming the event and the rule.
fn assert_first_refusal_is_named(parked: &[factline_projections::ParkedEvent]) {
    let first = parked.iter().find(|p| p.attempts > 0).unwrap();
    let wanted = format!(
        "PaymentReceived at position {} (stream {}): update of invoices found no row for this event",
        first.position, first.stream_id
    );
    assert!(
        first.error.contains(&wanted),
        "{:?} should say {wanted:?}",
        first.error
    );
}

#[tokio::test]
async fn a_declared_read_model_on_postgres_equals_the_fold_and_parks_what_it_cannot_apply() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let fold = history(&store).await;
    let db = factline_testkit::pg::database().await;
    let sink = PostgresSink::connect(&db.url, "invoices_read", projection())
        .await
        .unwrap();
    run(&store, sink).await;

    let client = factline_testkit::pg::connect(&db.url).await;
    let rows = |sql: &str| {
        let sql = sql.replace("{s}", "invoices_read.");
        let client = &client;
        async move {
            client
                .query(&sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| r.get::<_, Option<String>>(i))
                        .collect()
                })
                .collect::<Rows>()
        }
    };
    let (invoices, revenue) = expected(&fold);
    assert_eq!(rows(INVOICE_ROWS).await, invoices);
    assert_eq!(rows(REVENUE_ROWS).await, revenue);
    let admin = PostgresAdmin::connect(&db.url, "invoices_read")
        .await
        .unwrap();
    let parked = admin.parked("invoices").await.unwrap();
    let positions: Vec<u64> = parked.iter().map(|p| p.position).collect();
    assert_eq!(positions, fold.parked);
    assert_first_refusal_is_named(&parked);
}

/// The invoices read model with `payments` counting `weight` per payment,
/// at `version`.
fn changed(weight: i64, version: u32) -> Portable<DeclaredProjection> {
    let text = INVOICES
        .replace("payments = 1", &format!("payments = {weight}"))
        .replace("version = 1", &format!("version = {version}"));
    let definitions = Definitions::parse(&text, "invoices.toml").unwrap();
    Portable::new(definitions.projection("invoices").unwrap())
}

fn assert_refused_as_changed(error: factline_projections::ProjectionError) {
    let message = error.to_string();
    assert!(
        message.starts_with("projection invoices: version 1 was built from another definition")
            && message.contains("raise its version"),
        "{message}"
    );
}

#[tokio::test]
async fn on_sqlite_a_changed_definition_needs_a_new_version_which_rebuilds_it() {
    use factline_projections::VersionedSink;
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let fold = history(&store).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("read.db");
    run(&store, SqliteSink::open(&path, projection()).unwrap()).await;

    let refused = SqliteSink::open(&path, changed(2, 1)).err().unwrap();
    assert_refused_as_changed(refused);
    let sink = SqliteSink::open_rebuild(&path, changed(2, 2)).unwrap();
    let mut runner = Runner::new(store.clone(), sink).with_poison_policy(PoisonPolicy::Park);
    runner
        .catch_up(store.head_position().await.unwrap())
        .await
        .unwrap();
    let mut sink = runner.into_sink();
    assert_eq!(sink.swap(false).await.unwrap(), Some(1));

    let payments: i64 = fold.revenue.values().map(|r| r.1).sum();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let counted: i64 = conn
        .query_row("SELECT sum(payments) FROM revenue_per_day", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(counted, 2 * payments, "the view shows version 2");
    SqliteSink::open(&path, changed(2, 2)).expect("the new version runs live");
    SqliteSink::open_rebuild(&path, changed(3, 1))
        .expect("version 1 was dropped with its definition: it may be built again");
}

#[tokio::test]
async fn on_postgres_a_changed_definition_needs_a_new_version_which_rebuilds_it() {
    use factline_projections::VersionedSink;
    let store: Arc<dyn EventStore> = Arc::new(InMemoryStore::new());
    let fold = history(&store).await;
    let db = factline_testkit::pg::database().await;
    let schema = "invoices_read";
    run(
        &store,
        PostgresSink::connect(&db.url, schema, projection())
            .await
            .unwrap(),
    )
    .await;

    let refused = PostgresSink::connect(&db.url, schema, changed(2, 1))
        .await
        .err()
        .unwrap();
    assert_refused_as_changed(refused);
    let sink = PostgresSink::connect_rebuild(&db.url, schema, changed(2, 2))
        .await
        .unwrap();
    let mut runner = Runner::new(store.clone(), sink).with_poison_policy(PoisonPolicy::Park);
    runner
        .catch_up(store.head_position().await.unwrap())
        .await
        .unwrap();
    let mut sink = runner.into_sink();
    assert_eq!(sink.swap(false).await.unwrap(), Some(1));

    let payments: i64 = fold.revenue.values().map(|r| r.1).sum();
    let client = factline_testkit::pg::connect(&db.url).await;
    let counted: i64 = client
        .query_one(
            "SELECT sum(payments)::bigint FROM invoices_read.revenue_per_day",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(counted, 2 * payments, "the view shows version 2");
    PostgresSink::connect(&db.url, schema, changed(2, 2))
        .await
        .expect("the new version runs live");
}
