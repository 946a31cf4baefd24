//! The HTTP API against every backend: append, read, subscribe, errors.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::{SseReader, TestServer};
use factline_core::{EventStore, InMemoryStore};
use factline_server::ServerConfig;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

fn config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.body_limit = 256 * 1024;
    config.heartbeat = Duration::from_millis(200);
    config.max_page = 50;
    config
}

async fn api_behaviour(store: Arc<dyn EventStore>) {
    let server = TestServer::start(store, config()).await;

    // One event, then an array, with expected versions.
    let (status, body) = server
        .post(
            "/streams/Order-1",
            r#"{"type":"OrderPlaced","data":{"total":10}}"#,
            &[("Expected-Version", "no_stream")],
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body,
        json!({"stream_id":"Order-1","first_version":1,"last_version":1,"first_position":1,"last_position":1})
    );
    let batch = r#"[{"event_id":"0193a1b2-0000-7000-8000-000000000001","type":"OrderPaid"},
                    {"event_id":"0193a1b2-0000-7000-8000-000000000002","type":"OrderShipped","metadata":{"correlation_id":"c-9"}}]"#;
    let (status, first) = server
        .post("/streams/Order-1", batch, &[("Expected-Version", "1")])
        .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(
        (
            first["first_version"].as_u64(),
            first["last_version"].as_u64()
        ),
        (Some(2), Some(3))
    );
    // Retrying the same event ids returns the original result (S3), even
    // with an expectation that no longer holds.
    let (status, again) = server
        .post("/streams/Order-1", batch, &[("Expected-Version", "1")])
        .await;
    assert_eq!((status, &again), (201, &first));

    // A stale expectation is a conflict naming both versions.
    let (status, body) = server
        .post(
            "/streams/Order-1",
            r#"{"type":"X"}"#,
            &[("Expected-Version", "1")],
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(
        (&body["error"], &body["expected"], &body["actual"]),
        (&json!("conflict"), &json!(1), &json!(3))
    );
    let (status, body) = server
        .post(
            "/streams/Order-1",
            r#"{"type":"X"}"#,
            &[("Expected-Version", "no_stream")],
        )
        .await;
    assert_eq!((status, &body["expected"]), (409, &json!("no_stream")));

    // Bad input is refused with a body that names the problem.
    for (path, body, headers, says) in [
        ("/streams/Order-1", "{", vec![], "not an event"),
        ("/streams/Order-1", "", vec![], "empty"),
        ("/streams/Order-1", "[]", vec![], "no events"),
        ("/streams/Order-1", r#"{"typ":"X"}"#, vec![], "not an event"),
        (
            "/streams/Order-1",
            r#"{"type":"X"}"#,
            vec![("Expected-Version", "soon")],
            "Expected-Version",
        ),
        ("/streams/$bad", r#"{"type":"X"}"#, vec![], "stream"),
    ] {
        let (status, answer) = server.post(path, body, &headers).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"], "invalid_request");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    // Over the body limit, and one event over the store's event limit.
    let big = format!(r#"{{"type":"X","data":"{}"}}"#, "x".repeat(70 * 1024));
    let (status, answer) = server.post("/streams/Order-1", &big, &[]).await;
    assert_eq!(
        (status, &answer["error"]),
        (413, &json!("too_large")),
        "{answer}"
    );
    let (_, stream) = server.get("/streams/Order-1").await;
    assert_eq!(
        stream["events"].as_array().unwrap().len(),
        3,
        "nothing was written"
    );

    // An idempotency key answers a repeat from what it stored.
    let keyed = [("Idempotency-Key", "pay-2")];
    let (status, first) = server
        .post("/streams/Order-2", r#"{"type":"OrderPaid"}"#, &keyed)
        .await;
    assert_eq!(status, 201);
    let response = server
        .client
        .post(server.url("/streams/Order-2"))
        .header("Idempotency-Key", "pay-2")
        .body(r#"{"type":"OrderPaid"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(response.json::<Value>().await.unwrap(), first);
    let (status, answer) = server
        .post("/streams/Order-2", r#"{"type":"Other"}"#, &keyed)
        .await;
    assert_eq!(
        (status, &answer["error"]),
        (422, &json!("idempotency_key_reused"))
    );

    // A correlation id header fills events that carry none.
    server
        .post(
            "/streams/Customer-7",
            r#"[{"type":"Registered"},{"type":"Moved","metadata":{"correlation_id":"own"}}]"#,
            &[("Correlation-Id", "req-77")],
        )
        .await;

    // Reads.
    let (status, read) = server
        .get("/streams/Order-1?direction=backwards&limit=2")
        .await;
    assert_eq!(status, 200);
    let versions: Vec<u64> = read["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [3, 2]);
    let (_, read) = server.get("/streams/Order-1?from=2").await;
    let event = &read["events"][0];
    assert_eq!(event["event_type"], "OrderPaid");
    for field in [
        "stream_id",
        "version",
        "position",
        "event_id",
        "data",
        "metadata",
        "recorded_at",
    ] {
        assert!(
            event.get(field).is_some(),
            "recorded events carry {field}: {event}"
        );
    }
    let (_, missing) = server.get("/streams/Order-404").await;
    assert_eq!(missing, json!({"events": []}));
    let (_, all) = server.get("/all?from=2&limit=3").await;
    let positions: Vec<u64> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [2, 3, 4]);
    let (_, customers) = server.get("/categories/Customer").await;
    let correlations: Vec<&str> = customers["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["correlation_id"].as_str().unwrap())
        .collect();
    assert_eq!(correlations, ["req-77", "own"]);
    for (path, says) in [
        ("/all?limit=0", "limit"),
        ("/all?limit=51", "limit"),
        ("/all?from=x", "from"),
        ("/all?form=1", "unknown"),
        ("/streams/Order-1?direction=up", "direction"),
        ("/categories/Order-1", "category"),
    ] {
        let (status, answer) = server.get(path).await;
        assert_eq!(status, 400, "{path}");
        assert!(
            answer["message"].as_str().unwrap().contains(says),
            "{path}: {answer}"
        );
    }
    let (status, answer) = server.get("/nowhere").await;
    assert_eq!((status, &answer["error"]), (404, &json!("not_found")));

    // Health and readiness.
    assert_eq!(server.get("/health").await.0, 200);
    let (status, ready) = server.get("/ready").await;
    assert_eq!((status, &ready["status"]), (200, &json!("ready")));
    assert_eq!(ready["head_position"], 6);

    subscriptions(&server).await;

    // An event id retried with another payload is refused, not dropped.
    let id = "0193a1b2-0000-7000-8000-0000000000aa";
    let sent = format!(r#"{{"event_id":"{id}","type":"OrderPaid","data":{{"a":1}}}}"#);
    let (status, first) = server.post("/streams/Order-3", &sent, &[]).await;
    assert_eq!(status, 201, "{first}");
    let respaced = format!(r#"{{"event_id":"{id}","type":"OrderPaid","data":{{ "a": 1 }}}}"#);
    assert_eq!(
        server.post("/streams/Order-3", &respaced, &[]).await,
        (201, first)
    );
    let changed = format!(r#"{{"event_id":"{id}","type":"OrderPaid","data":{{"a":2}}}}"#);
    let (status, answer) = server.post("/streams/Order-3", &changed, &[]).await;
    assert_eq!(
        (status, &answer["error"]),
        (409, &json!("idempotency_mismatch")),
        "{answer}"
    );

    server.stop().await;
}

/// Catch-up then live, resumption by Last-Event-ID, filters, heartbeats.
async fn subscriptions(server: &TestServer) {
    let mut all = SseReader::open(&server.client, &server.url("/subscribe/all"), None).await;
    let mut orders = SseReader::open(
        &server.client,
        &server.url("/subscribe/categories/Order?from=2"),
        None,
    )
    .await;
    let mut one = SseReader::open(
        &server.client,
        &server.url("/subscribe/streams/Order-2"),
        None,
    )
    .await;
    let mut new_only =
        SseReader::open(&server.client, &server.url("/subscribe/all?from=end"), None).await;
    for expected in 1..=6 {
        assert_eq!(all.event(WAIT).await["position"], expected);
    }
    for expected in [2, 3, 4] {
        assert_eq!(orders.event(WAIT).await["position"], expected);
    }
    assert_eq!(one.event(WAIT).await["stream_id"], "Order-2");

    // Idle: heartbeats keep the connection alive.
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Live events while the subscribers wait, appended concurrently.
    let appends: Vec<_> = (0..20)
        .map(|i| {
            let client = server.client.clone();
            let url = server.url(&format!("/streams/Order-{}", 10 + i % 4));
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .body(r#"{"type":"OrderPlaced"}"#)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            })
        })
        .collect();
    for a in appends {
        a.await.unwrap();
    }
    for expected in 7..=26 {
        assert_eq!(
            all.event(WAIT).await["position"],
            expected,
            "no gap or duplicate at the hand-over"
        );
        assert_eq!(new_only.event(WAIT).await["position"], expected);
    }
    for expected in 7..=26 {
        assert_eq!(orders.event(WAIT).await["position"], expected);
    }
    // Nothing more arrives on the one-stream subscription but heartbeats.
    let quiet = tokio::time::timeout(Duration::from_millis(500), one.next()).await;
    assert!(quiet.is_err(), "the Order-2 subscription got {quiet:?}");
    assert!(
        all.comments > 0 && one.comments > 0,
        "heartbeats were sent while idle"
    );

    // A reconnect with Last-Event-ID resumes right after it.
    let mut resumed = SseReader::open(
        &server.client,
        &server.url("/subscribe/all?from=1"),
        Some(20),
    )
    .await;
    for expected in 21..=26 {
        assert_eq!(resumed.event(WAIT).await["position"], expected);
    }
    // Not a position: refused, never wrapped around to a replay from 1.
    for last in ["soon", "18446744073709551615", "9223372036854775807", "-1"] {
        let response = server
            .client
            .get(server.url("/subscribe/all"))
            .header("Last-Event-ID", last)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "Last-Event-ID {last}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_works_on_the_in_memory_store() {
    api_behaviour(Arc::new(InMemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_works_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = factline_sqlite::SqliteStore::open(dir.path().join("api.db")).unwrap();
    api_behaviour(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_works_on_postgres() {
    let db = factline_testkit::pg::database().await;
    let store = factline_postgres::PostgresStore::connect(&db.url)
        .await
        .unwrap();
    api_behaviour(Arc::new(store)).await;
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let server = TestServer::start(Arc::new(InMemoryStore::new()), config()).await;
    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (route, method) in [
        ("/streams/{stream_id}", "post"),
        ("/streams/{stream_id}", "get"),
        ("/all", "get"),
        ("/categories/{category}", "get"),
        ("/subscribe/all", "get"),
        ("/subscribe/streams/{stream_id}", "get"),
        ("/subscribe/categories/{category}", "get"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
        ("/admin/projections", "get"),
        ("/admin/projections/{name}/rebuild", "post"),
        ("/admin/projections/{name}/pause", "post"),
        ("/admin/projections/{name}/resume", "post"),
        ("/admin/projections/{name}/parked", "get"),
        ("/admin/outbox", "get"),
        ("/", "get"),
        ("/dashboard/data", "get"),
        ("/read-models", "get"),
        ("/read-models/{name}/tables/{table}", "get"),
        ("/read-models/{name}/queries/{query}", "get"),
    ] {
        assert!(
            paths.get(route).and_then(|p| p.get(method)).is_some(),
            "{method} {route} is documented"
        );
        // And the router answers it (anything but the fallback's 404).
        let concrete = route
            .replace("{stream_id}", "Order-1")
            .replace("{category}", "Order")
            .replace("{name}", "x")
            .replace("{table}", "t")
            .replace("{query}", "q");
        if method == "get" && !concrete.starts_with("/subscribe") {
            let (status, body) = server.get(&concrete).await;
            assert!(
                status != 404 || !body["message"].as_str().unwrap_or("").contains("no route"),
                "{route} is routed"
            );
        }
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    assert!(schemas.contains_key("AppendResultDoc") && schemas.contains_key("ErrorDoc"));
    // The bearer scheme, and 401/403 on every protected operation only.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    for (route, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let open = operation["security"] == json!([{}]);
            let responses = operation["responses"].as_object().unwrap();
            assert_eq!(
                open,
                ["/health", "/ready", "/openapi.json", "/"].contains(&route.as_str()),
                "{method} {route}"
            );
            assert_eq!(responses.contains_key("401"), !open, "{method} {route}");
            for status in ["400", "403", "500", "503"] {
                assert!(responses.contains_key(status), "{method} {route} {status}");
            }
            if method == "post" {
                assert!(responses.contains_key("415") && responses.contains_key("413"));
            }
        }
    }
    // The limits: this server's page size, directions, expected versions.
    let parameter = |route: &str, name: &str| {
        paths[route]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["schema"]
            .clone()
    };
    assert_eq!(parameter("/all", "limit")["maximum"], config().max_page);
    assert_eq!(parameter("/all", "limit")["minimum"], 1);
    assert_eq!(
        parameter("/streams/{stream_id}", "direction")["enum"],
        json!(["forwards", "backwards"])
    );
    let expected = paths["/streams/{stream_id}"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Expected-Version")
        .unwrap()["schema"]["pattern"]
        .clone();
    assert!(expected.as_str().unwrap().contains("no_stream"));
    server.stop().await;
}

/// A server built without a shutdown watch keeps its subscriptions open
/// (and follows live) until the client leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_stay_open_without_a_shutdown_watch() {
    let router = factline_server::Server::new(Arc::new(InMemoryStore::new()), config()).router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let served = tokio::spawn(factline_server::serve(
        listener,
        router,
        std::future::pending(),
    ));
    let client = common::json_client();
    let mut live = SseReader::open(&client, &format!("{base}/subscribe/all"), None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let appended = client
        .post(format!("{base}/streams/Order-1"))
        .body(r#"{"type":"OrderPlaced"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(appended.status(), 201);
    assert_eq!(live.event(WAIT).await["position"], 1);
    served.abort();
}
