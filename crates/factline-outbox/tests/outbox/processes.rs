//! Real processes: an appender killed right after its commits (every
//! committed event is published afterwards, and nothing else), and three
//! relay processes sharing one PostgreSQL outbox (each record published
//! once, each stream in order).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use factline_core::{EventData, EventStore, ExpectedVersion, StreamId};
use factline_outbox::{
    Message, OutboxDb, PostgresOutbox, Publication, Relay, RelayConfig, Sink, SinkError,
    SqliteOutbox,
};
use serde_json::json;

const ROLE: &str = "FACTLINE_TEST_OUTBOX_ROLE";

fn child(test: &str, role: String) -> Child {
    factline_testkit::process::rerun(&factline_testkit::process::test_name(module_path!(), test))
        .env(ROLE, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn open_store(db: &str) -> Arc<dyn EventStore> {
    if db.starts_with("postgres") {
        Arc::new(factline_postgres::PostgresStore::connect(db).await.unwrap())
    } else {
        Arc::new(factline_sqlite::SqliteStore::open(db).unwrap())
    }
}

async fn open_outbox(db: &str) -> Arc<dyn OutboxDb> {
    if db.starts_with("postgres") {
        Arc::new(PostgresOutbox::connect(db, "factline").await.unwrap())
    } else {
        Arc::new(SqliteOutbox::open(db).unwrap())
    }
}

/// Keeps every message it is given.
#[derive(Default)]
struct Keep(Mutex<Vec<Message>>);

#[async_trait]
impl Sink for Keep {
    fn describe(&self) -> String {
        "keep".into()
    }
    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        self.0.lock().unwrap().extend_from_slice(messages);
        messages.iter().map(|_| Ok(())).collect()
    }
}

// ------------------------------------------------ killed after commits

/// The child: appends one event at a time and says so after each commit,
/// until it is killed.
async fn appender(db: &str) {
    let store = open_store(db).await;
    let mut out = std::io::stdout();
    for n in 0.. {
        let stream = StreamId::new(format!("Order-{}", n % 7)).unwrap();
        let kind = if n % 5 == 0 { "Noted" } else { "Changed" };
        let appended = store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![EventData::new(kind, json!({ "n": n }))],
            )
            .await
            .unwrap();
        writeln!(out, "committed {}", appended.last_position).unwrap();
        out.flush().unwrap();
    }
}

fn killed_after_commits(test: &str, db: &str) {
    let rt = factline_testkit::runtime();
    let outbox = rt.block_on(async {
        let _store = open_store(db).await;
        let outbox = open_outbox(db).await;
        outbox
            .add_publication(Publication::category("Order").of_type("Changed"))
            .await
            .unwrap();
        outbox
    });
    let mut rng = fastrand::Rng::with_seed(3);
    let mut committed = BTreeSet::new();
    for _ in 0..5 {
        let mut appender = child(test, format!("append {db}"));
        let lines = BufReader::new(appender.stdout.take().unwrap()).lines();
        let kill_after = rng.usize(20..120);
        // The test harness prints its own lines too.
        let commits = lines
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("committed ").map(str::to_owned));
        for (seen, line) in commits.enumerate() {
            let position: u64 = line.parse().unwrap();
            committed.insert(position);
            if seen + 1 == kill_after {
                // Right after a commit, before anything else can happen.
                appender.kill().unwrap();
                break;
            }
        }
        appender.wait().unwrap();
    }
    rt.block_on(async {
        let store = open_store(db).await;
        let sink = Arc::new(Keep::default());
        let relay = Relay::new(outbox.clone(), sink.clone(), RelayConfig::default());
        relay.heartbeat().await.unwrap();
        while relay.round().await.unwrap().pending > 0 {}
        let published: BTreeSet<u64> = sink.0.lock().unwrap().iter().map(|m| m.position).collect();
        let stored = store.read_all(1, usize::MAX).await.unwrap();
        let in_store: BTreeSet<u64> = stored.iter().map(|e| e.position).collect();
        assert!(
            committed.is_subset(&in_store),
            "every commit an appender reported is in the store"
        );
        // Exactly the committed events that match the publication, the
        // last ones before each kill included.
        let wanted: BTreeSet<u64> = stored
            .iter()
            .filter(|e| e.event_type == "Changed")
            .map(|e| e.position)
            .collect();
        assert_eq!(published, wanted);
        let reported_and_published = committed.intersection(&wanted).count();
        assert!(reported_and_published > 50, "{reported_and_published}");
        assert_eq!(outbox.status().await.unwrap().backlog, 0);
    });
}

#[test]
fn sqlite_appenders_killed_after_commits_have_every_commit_published() {
    const TEST: &str = "sqlite_appenders_killed_after_commits_have_every_commit_published";
    if let Ok(role) = std::env::var(ROLE) {
        let db = role.strip_prefix("append ").unwrap();
        return factline_testkit::runtime().block_on(appender(db));
    }
    let dir = tempfile::tempdir().unwrap();
    killed_after_commits(TEST, dir.path().join("f.db").to_str().unwrap());
}

#[test]
fn postgres_appenders_killed_after_commits_have_every_commit_published() {
    const TEST: &str = "postgres_appenders_killed_after_commits_have_every_commit_published";
    if let Ok(role) = std::env::var(ROLE) {
        let db = role.strip_prefix("append ").unwrap();
        return factline_testkit::runtime().block_on(appender(db));
    }
    let rt = factline_testkit::runtime();
    let db = rt.block_on(factline_testkit::pg::database());
    drop(rt);
    killed_after_commits(TEST, &db.url);
}

// ---------------------------------------------------- three relays

/// Appends a line per published message to its own file:
/// `relay position stream version nanos`.
struct Lines {
    relay: String,
    file: Mutex<std::fs::File>,
}

#[async_trait]
impl Sink for Lines {
    fn describe(&self) -> String {
        "lines".into()
    }
    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        let mut file = self.file.lock().unwrap();
        for m in messages {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            writeln!(
                file,
                "{} {} {} {} {nanos}",
                self.relay, m.position, m.stream_id, m.version
            )
            .unwrap();
        }
        file.flush().unwrap();
        messages.iter().map(|_| Ok(())).collect()
    }
}

/// The child: a relay until its stop file appears.
async fn relay_process(db: &str, dir: &Path, id: &str) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{id}.lines")))
        .unwrap();
    let sink = Arc::new(Lines {
        relay: id.into(),
        file: Mutex::new(file),
    });
    let store = open_store(db).await;
    let config = {
        let mut config = RelayConfig::default();
        config.relay_id = id.into();
        config.batch = 50;
        config.heartbeat = Duration::from_millis(300);
        config.fallback_poll = Duration::from_millis(50);
        config
    };
    let relay = Relay::new(open_outbox(db).await, sink, config).woken_by(store.watch_head());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop_file = dir.join(format!("{id}.stop"));
    let parent = std::os::unix::process::parent_id();
    tokio::spawn(async move {
        while !stop_file.exists() {
            if std::os::unix::process::parent_id() != parent {
                // The test died: do not outlive it.
                std::process::exit(1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send_replace(true);
    });
    relay.run(stopped).await.unwrap();
    println!("stopped");
}

#[test]
fn three_postgres_relays_share_the_outbox_and_publish_each_record_once_in_order() {
    const TEST: &str =
        "three_postgres_relays_share_the_outbox_and_publish_each_record_once_in_order";
    if let Ok(role) = std::env::var(ROLE) {
        let mut parts = role.splitn(4, ' ');
        let (_, db, dir, id) = (
            parts.next(),
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        return factline_testkit::runtime().block_on(relay_process(db, Path::new(dir), id));
    }
    let rt = factline_testkit::runtime();
    let db = rt.block_on(factline_testkit::pg::database());
    let dir = tempfile::tempdir().unwrap();
    let (store, outbox) = rt.block_on(async {
        let store = open_store(&db.url).await;
        let outbox = open_outbox(&db.url).await;
        outbox
            .add_publication(Publication::everything())
            .await
            .unwrap();
        (store, outbox)
    });
    let start = |id: &str| {
        child(
            TEST,
            format!("relay {} {} {id}", db.url, dir.path().display()),
        )
    };
    let stop = |id: &str| std::fs::write(dir.path().join(format!("{id}.stop")), "").unwrap();
    let stopped = |mut relay: Child| {
        let said: Vec<String> = BufReader::new(relay.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .collect();
        assert!(relay.wait().unwrap().success());
        assert!(
            said.iter().any(|l| l.ends_with("stopped")),
            "the relay did not stop cleanly: {said:?}"
        );
    };

    // At least 6 000 events over 150 streams, and on until every relay
    // has published while the others ran, however slow the machine.
    let enough = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (store, enough) = (store.clone(), enough.clone());
        rt.spawn(async move {
            let mut last: BTreeMap<String, u64> = BTreeMap::new();
            for n in 0u64.. {
                if n >= 3_000 && enough.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let stream = format!("S-{}", n % 150);
                let events = vec![
                    EventData::new("A", json!({ "n": n })),
                    EventData::new("B", json!({ "n": n })),
                ];
                store
                    .append(
                        &StreamId::new(&stream).unwrap(),
                        ExpectedVersion::Any,
                        events,
                    )
                    .await
                    .unwrap();
                *last.entry(stream).or_default() += 2;
                tokio::time::sleep(Duration::from_micros(1_500)).await;
            }
            last
        })
    };
    let has_published = |id: &str| {
        let file = dir.path().join(format!("{id}.lines"));
        for _ in 0..600 {
            if std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("relay {id} published nothing: the lanes were not shared");
    };
    let a = start("a");
    has_published("a");
    let b = start("b");
    has_published("b");
    let c = start("c");
    has_published("c");
    stop("b");
    stopped(b);
    enough.store(true, std::sync::atomic::Ordering::Relaxed);
    let expected = rt.block_on(load).unwrap();
    rt.block_on(async {
        for _ in 0..600 {
            if outbox.status().await.unwrap().backlog == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the relays did not drain the outbox");
    });
    stop("a");
    stop("c");
    stopped(a);
    stopped(c);

    let mut lines: Vec<(u128, String, u64, String, u64)> = Vec::new();
    for id in ["a", "b", "c"] {
        let text = std::fs::read_to_string(dir.path().join(format!("{id}.lines"))).unwrap();
        let mut count = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            lines.push((
                f[4].parse().unwrap(),
                f[0].into(),
                f[1].parse().unwrap(),
                f[2].into(),
                f[3].parse().unwrap(),
            ));
            count += 1;
        }
        assert!(
            count > 0,
            "relay {id} published nothing: the lanes were not shared"
        );
    }
    let positions: BTreeSet<u64> = lines.iter().map(|l| l.2).collect();
    assert_eq!(positions.len(), lines.len(), "a record was published twice");
    assert_eq!(lines.len() as u64, expected.values().sum::<u64>());
    lines.sort();
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, _, _, stream, version) in &lines {
        versions.entry(stream.clone()).or_default().push(*version);
    }
    for (stream, last) in &expected {
        assert_eq!(
            versions[stream],
            (1..=*last).collect::<Vec<_>>(),
            "stream {stream}"
        );
    }
}
