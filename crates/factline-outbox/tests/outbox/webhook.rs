//! The webhook sink against a small HTTP server on loopback that fails,
//! stalls past the timeout, and then accepts, and that refuses one kind of
//! event for good.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use factline_core::{EventData, EventStore, ExpectedVersion, RecordedEvent, StreamId};
use factline_outbox::{OutboxDb, Publication, Relay, RelayConfig, SqliteOutbox, WebhookSink};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Default)]
struct Server {
    /// Requests seen per position.
    offers: BTreeMap<u64, usize>,
    /// Accepted requests: headers and the event in the body.
    accepted: Vec<(BTreeMap<String, String>, RecordedEvent)>,
}

/// Answers 500 to the first offer of every fourth position, stalls the
/// first offer of every seventh past the client's timeout, accepts the
/// rest.
async fn serve(listener: tokio::net::TcpListener, state: Arc<Mutex<Server>>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let (read, mut write) = socket.into_split();
            let mut read = BufReader::new(read);
            loop {
                let mut headers = BTreeMap::new();
                let mut line = String::new();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                loop {
                    line.clear();
                    read.read_line(&mut line).await.unwrap();
                    let Some((name, value)) = line.trim_end().split_once(": ") else {
                        break;
                    };
                    headers.insert(name.to_ascii_lowercase(), value.to_owned());
                }
                let length: usize = headers["content-length"].parse().unwrap();
                let mut body = vec![0; length];
                read.read_exact(&mut body).await.unwrap();
                let event: RecordedEvent = serde_json::from_slice(&body).unwrap();
                let (offer, position) = {
                    let mut state = state.lock().unwrap();
                    let offers = state.offers.entry(event.position).or_insert(0);
                    *offers += 1;
                    (*offers, event.position)
                };
                if offer == 1 && position % 7 == 0 {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    return;
                }
                let status = if event.event_type == "Refused" {
                    "422 Unprocessable Entity"
                } else if offer == 1 && position % 4 == 0 {
                    "500 Internal Server Error"
                } else {
                    state.lock().unwrap().accepted.push((headers, event));
                    "204 No Content"
                };
                let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                if write.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_every_event_in_order_through_failures_and_timeouts_and_refusals_are_parked() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let state = Arc::new(Mutex::new(Server::default()));
    tokio::spawn(serve(listener, state.clone()));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.db");
    let store: Arc<dyn EventStore> = Arc::new(factline_sqlite::SqliteStore::open(&path).unwrap());
    let db: Arc<dyn OutboxDb> = Arc::new(SqliteOutbox::open(&path).unwrap());
    db.add_publication(Publication::everything()).await.unwrap();
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut refused = 0;
    for n in 0..40u64 {
        let stream = format!("Hook-{}", n % 5);
        // A 4xx is the destination refusing this event: parked, not retried.
        let event_type = if n % 10 == 3 { "Refused" } else { "Hooked" };
        let appended = store
            .append(
                &StreamId::new(&stream).unwrap(),
                ExpectedVersion::Any,
                vec![EventData::new(event_type, json!({ "n": n }))],
            )
            .await
            .unwrap();
        if event_type == "Refused" {
            refused += 1;
        } else {
            expected
                .entry(stream)
                .or_default()
                .push(appended.last_version);
        }
    }

    let sink = Arc::new(
        WebhookSink::new(&url, Duration::from_secs(1))
            .unwrap()
            .with_attempts(1),
    );
    let relay = Relay::new(db.clone(), sink, RelayConfig::default());
    relay.heartbeat().await.unwrap();
    for _ in 0..100 {
        if relay.round().await.unwrap().pending == 0 {
            break;
        }
    }
    let status = db.status().await.unwrap();
    assert_eq!((status.backlog, status.parked), (0, refused));
    let parked = db.parked(100).await.unwrap();
    assert!(parked.iter().all(
        |p| p.event_type == "Refused" && p.error.ends_with("answered 422 Unprocessable Entity")
    ));
    let stats = relay.stats().snapshot();
    assert!(
        stats.failed >= 10,
        "failures and timeouts were retried: {stats:?}"
    );

    let state = state.lock().unwrap();
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (headers, event) in &state.accepted {
        assert_eq!(headers["idempotency-key"], event.event_id.to_string());
        assert_eq!(headers["factline-event-id"], event.event_id.to_string());
        assert_eq!(headers["factline-event-type"], "Hooked");
        assert_eq!(headers["factline-stream-id"], event.stream_id.as_str());
        assert_eq!(headers["content-type"], "application/json");
        versions
            .entry(event.stream_id.to_string())
            .or_default()
            .push(event.version);
    }
    assert_eq!(
        versions, expected,
        "each stream in order, past its refused events"
    );
    // Offered until the server answered at all (a stalled first offer is
    // retried), then never again.
    for p in &parked {
        let stalled_first = usize::from(p.position % 7 == 0);
        assert_eq!(state.offers[&p.position], 1 + stalled_first, "{p:?}");
    }
}
