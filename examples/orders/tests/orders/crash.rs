//! Issue 5, item 13: a process running the three orders projections is
//! killed with SIGKILL at random points, 20 times, while it catches up on a
//! history of 200 000 events, and restarted each time; afterwards every
//! read model equals the reference fold of the full history. The test
//! binary re-runs itself as the child.

use crate::common;

use factline_testkit::process::KillPlan;
use std::sync::Arc;

use common::{read_postgres, read_sqlite, reference};
use factline_core::EventStore;
use factline_orders::history::{self, HistoryConfig};
use factline_orders::read_models::{CustomerTotals, OrderList, RevenueByRegionDay};
use factline_projections::{Portable, PostgresSink, Runner, Sink, SqliteSink};

const CHILD: &str = "FACTLINE_TEST_ORDERS_CRASH_CHILD";
const EVENTS: u64 = 200_000;
const KILLS: usize = 20;
const SCHEMA: &str = "orders_read";

/// Catches `sink` up to the head, printing a line after every batch.
async fn catch_up<S: Sink + 'static>(store: Arc<dyn EventStore>, sink: S) {
    let mut runner = Runner::new(store, sink);
    let name = runner.sink().name().to_owned();
    let mut progress = runner.watch_checkpoint();
    let printer = tokio::spawn(async move {
        while progress.changed().await.is_ok() {
            let at = *progress.borrow_and_update();
            println!("at {name} {at}");
        }
    });
    runner.catch_up(u64::MAX).await.unwrap();
    drop(runner);
    printer.await.unwrap();
}

/// The child: the three projections catch up side by side.
async fn child_sqlite(path: &std::path::Path) {
    let store: Arc<dyn EventStore> = Arc::new(factline_sqlite::SqliteStore::open(path).unwrap());
    tokio::join!(
        catch_up(
            store.clone(),
            SqliteSink::open(path, Portable::new(OrderList)).unwrap()
        ),
        catch_up(
            store.clone(),
            SqliteSink::open(path, Portable::new(RevenueByRegionDay::new())).unwrap()
        ),
        catch_up(
            store.clone(),
            SqliteSink::open(path, Portable::new(CustomerTotals)).unwrap()
        ),
    );
    println!("done");
}

async fn child_postgres(url: &str) {
    let store: Arc<dyn EventStore> = Arc::new(
        factline_postgres::PostgresStore::connect(url)
            .await
            .unwrap(),
    );
    let (a, b, c) = tokio::join!(
        PostgresSink::connect(url, SCHEMA, Portable::new(OrderList)),
        PostgresSink::connect(url, SCHEMA, Portable::new(RevenueByRegionDay::new())),
        PostgresSink::connect(url, SCHEMA, Portable::new(CustomerTotals)),
    );
    tokio::join!(
        catch_up(store.clone(), a.unwrap()),
        catch_up(store.clone(), b.unwrap()),
        catch_up(store.clone(), c.unwrap()),
    );
    println!("done");
}

fn fill(
    store: Arc<dyn EventStore>,
    rt: &tokio::runtime::Runtime,
) -> Vec<factline_core::RecordedEvent> {
    rt.block_on(async {
        let head = history::fill(
            store.clone(),
            HistoryConfig {
                events: EVENTS,
                writers: 32,
            },
        )
        .await
        .unwrap();
        assert!(head >= EVENTS);
        store.read_all(1, usize::MAX).await.unwrap()
    })
}

#[test]
fn sqlite_orders_projections_killed_20_times_equal_the_reference_fold() {
    const TEST: &str = "sqlite_orders_projections_killed_20_times_equal_the_reference_fold";
    if let Ok(dir) = std::env::var(CHILD) {
        factline_testkit::runtime()
            .block_on(child_sqlite(&std::path::Path::new(&dir).join("events.db")));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let rt = factline_testkit::runtime();
    let history = {
        let store = Arc::new(factline_sqlite::SqliteStore::open(&path).unwrap());
        fill(store, &rt)
    };
    let commits = kill_repeatedly(
        &factline_testkit::process::test_name(module_path!(), TEST),
        (CHILD, dir.path().display().to_string()),
    );
    let expected = reference(&history);
    assert!(expected.orders.len() > 70_000 && expected.customers.len() > 700);
    assert_eq!(read_sqlite(&path), expected);
    println!("{commits} commits over {KILLS} kills");
}

#[test]
fn postgres_orders_projections_killed_20_times_equal_the_reference_fold() {
    const TEST: &str = "postgres_orders_projections_killed_20_times_equal_the_reference_fold";
    if let Ok(url) = std::env::var(CHILD) {
        factline_testkit::runtime().block_on(child_postgres(&url));
        return;
    }
    let rt = factline_testkit::runtime();
    let db = rt.block_on(factline_testkit::pg::database());
    let history = {
        let store = rt.block_on(factline_postgres::PostgresStore::connect(&db.url));
        fill(Arc::new(store.unwrap()), &rt)
    };
    let commits = kill_repeatedly(
        &factline_testkit::process::test_name(module_path!(), TEST),
        (CHILD, db.url.clone()),
    );
    let expected = reference(&history);
    assert_eq!(rt.block_on(read_postgres(&db.url, SCHEMA)), expected);
    println!("{commits} commits over {KILLS} kills");
}

/// Runs the child until it finishes by itself, first killing it `KILLS`
/// times: each time after a random number of its commits and then a random
/// pause, so the kill lands anywhere in a batch, whatever the machine's
/// speed. Returns how many commits the children reported.
fn kill_repeatedly(test: &str, env: (&str, String)) -> usize {
    let plan = KillPlan {
        kills: KILLS,
        seed: 13,
        after: 1..25,
        pause_ms: 0..40,
    };
    plan.run(test, &[(env.0, env.1)], |line| line.starts_with("at "))
        .progress
}
