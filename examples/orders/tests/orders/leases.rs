//! Issue 5, item 10 (P12): three processes run the same orders projections
//! on PostgreSQL; each projection has one owner at a time through its
//! lease, and when the owner is killed with SIGKILL another process takes
//! over within seconds. Events keep coming all along; at the end every
//! read model equals the reference fold of the history. The test binary
//! re-runs itself as the children.

use crate::common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{read_postgres, reference};
use factline_core::EventStore;
use factline_orders::history::{self, HistoryConfig};
use factline_orders::read_models::{CustomerTotals, OrderList, RevenueByRegionDay};
use factline_projections::{Portable, PostgresAdmin, PostgresSink, Runner, SqlProjection};

const CHILD: &str = "FACTLINE_TEST_ORDERS_LEASE_CHILD";
const SCHEMA: &str = "orders_read";
const TEST: &str = "owners_killed_repeatedly_hand_over_and_nothing_is_applied_twice";
const NAMES: [&str; 3] = ["order_list", "revenue", "customer_totals"];
const KILLS: usize = 6;

fn projection(name: &str) -> Box<dyn SqlProjection> {
    match name {
        "order_list" => Box::new(OrderList),
        "revenue" => Box::new(RevenueByRegionDay::new()),
        _ => Box::new(CustomerTotals),
    }
}

/// A child: every projection with a lease, live until stdin closes.
/// Prints `owner <name>` when it takes a projection's lease.
async fn child(url: String) {
    let store: Arc<dyn EventStore> = Arc::new(
        factline_postgres::PostgresStore::connect(&url)
            .await
            .unwrap(),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        stop.send_replace(true);
    });
    let mut tasks = Vec::new();
    for name in NAMES {
        let (store, url, stopped) = (store.clone(), url.clone(), stopped.clone());
        tasks.push(tokio::spawn(async move {
            let sink = PostgresSink::connect(&url, SCHEMA, Portable::new(projection(name)))
                .await
                .unwrap()
                .with_lease();
            let mut runner = Runner::new(store, sink);
            let mut waiting = stopped.clone();
            tokio::select! {
                taken = runner.sink_mut().acquire_lease() => taken.unwrap(),
                _ = waiting.wait_for(|s| *s) => return,
            }
            println!("owner {name}");
            runner.run(stopped).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

struct Worker {
    process: Child,
    id: usize,
}

/// Starts child `id`; its `owner` lines go to `events` as (child, name).
fn spawn(id: usize, url: &str, events: &mpsc::Sender<(usize, String, Instant)>) -> Worker {
    let mut process = factline_testkit::process::rerun(&factline_testkit::process::test_name(
        module_path!(),
        TEST,
    ))
    .env(CHILD, url)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    let stdout = process.stdout.take().unwrap();
    let events = events.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // (The harness's own "test … ..." may precede it on the line.)
            if let Some((_, name)) = line.split_once("owner ") {
                let _ = events.send((id, name.to_owned(), Instant::now()));
            }
        }
    });
    Worker { process, id }
}

#[test]
fn owners_killed_repeatedly_hand_over_and_nothing_is_applied_twice() {
    if let Ok(url) = std::env::var(CHILD) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(child(url));
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(factline_testkit::pg::database());
    let store: Arc<dyn EventStore> = Arc::new(
        rt.block_on(factline_postgres::PostgresStore::connect(&db.url))
            .unwrap(),
    );
    // Events keep coming while owners die.
    let filling = rt.spawn(history::fill(
        store.clone(),
        HistoryConfig {
            events: 60_000,
            writers: 8,
        },
    ));
    let (events, owners) = mpsc::channel();
    let mut children: Vec<Worker> = (0..3).map(|id| spawn(id, &db.url, &events)).collect();
    let mut next_id = 3;
    // Who owns each projection, and the takeover times seen.
    let mut owner: HashMap<String, usize> = HashMap::new();
    let mut killed: Vec<usize> = Vec::new();
    let mut takeovers = Vec::new();
    let record = |(id, name, at): (usize, String, Instant),
                  owner: &mut HashMap<String, usize>,
                  killed: &[usize]| {
        if let Some(previous) = owner.get(&name) {
            assert!(
                killed.contains(previous),
                "{name} taken by child {id} while child {previous} still owned it"
            );
        }
        owner.insert(name, id);
        at
    };
    while owner.len() < NAMES.len() {
        let event = owners
            .recv_timeout(Duration::from_secs(30))
            .expect("owners");
        record(event, &mut owner, &killed);
    }
    for round in 0..KILLS {
        std::thread::sleep(Duration::from_millis(300 + 150 * round as u64));
        // Kill the owner of one projection (in turn), with whatever else
        // it owns.
        let victim = owner[NAMES[round % NAMES.len()]];
        let index = children.iter().position(|c| c.id == victim).unwrap();
        let mut child = children.remove(index);
        child.process.kill().unwrap();
        let died = Instant::now();
        child.process.wait().unwrap();
        killed.push(victim);
        let orphaned: Vec<String> = owner
            .iter()
            .filter(|(_, o)| **o == victim)
            .map(|(n, _)| n.clone())
            .collect();
        // Every orphaned projection gets a new owner among the others.
        let mut waiting = orphaned.clone();
        while !waiting.is_empty() {
            let event = owners
                .recv_timeout(Duration::from_secs(30))
                .expect("a standby takes over");
            let name = event.1.clone();
            let at = record(event, &mut owner, &killed);
            if let Some(i) = waiting.iter().position(|n| *n == name) {
                waiting.remove(i);
                takeovers.push(at - died);
            }
        }
        children.push(spawn(next_id, &db.url, &events));
        next_id += 1;
    }
    let head = rt.block_on(filling).unwrap().unwrap();
    // The owners catch up to the head.
    let admin = rt
        .block_on(PostgresAdmin::connect(&db.url, SCHEMA))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let infos = rt.block_on(admin.projections()).unwrap();
        if infos.len() == 3 && infos.iter().all(|i| i.checkpoint == head) {
            break;
        }
        assert!(Instant::now() < deadline, "not caught up: {infos:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for mut child in children {
        drop(child.process.stdin.take());
        assert!(child.process.wait().unwrap().success());
    }
    let history = rt.block_on(store.read_all(1, usize::MAX)).unwrap();
    assert_eq!(history.len() as u64, head);
    assert_eq!(
        rt.block_on(read_postgres(&db.url, SCHEMA)),
        reference(&history)
    );
    takeovers.sort();
    println!(
        "{} takeovers after {KILLS} kills: fastest {:?}, slowest {:?}",
        takeovers.len(),
        takeovers[0],
        takeovers[takeovers.len() - 1]
    );
}
