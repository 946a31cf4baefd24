//! Bearer tokens and scopes, request limits, and the metrics a scrape shows.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use factline_core::{EventStore, InMemoryStore};
use factline_server::{InstrumentedStore, Server, ServerConfig, Tokens};

const WRITER: &str = "writer-token-0123456789";
const READER: &str = "reader-token-0123456789";
const OPS: &str = "ops-token-0123456789abc";

fn tokens() -> Tokens {
    Tokens::parse(&format!(
        r#"{{"tokens":[
            {{"name":"orders","token":"{WRITER}","read":["Order"],"write":["Order"]}},
            {{"name":"auditor","token":"{READER}","read":["*"]}},
            {{"name":"ops","token":"{OPS}","admin":["*"]}}
        ]}}"#
    ))
    .unwrap()
}

async fn status(server: &TestServer, method: &str, path: &str, token: Option<&str>) -> u16 {
    let mut request = match method {
        "POST" => server
            .client
            .post(server.url(path))
            .body(r#"{"type":"OrderPlaced"}"#),
        _ => server.client.get(server.url(path)),
    };
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = tokio::time::timeout(Duration::from_secs(10), request.send())
        .await
        .unwrap()
        .unwrap();
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_scoped_per_category() {
    let config = {
        let mut config = ServerConfig::default();
        config.tokens = Some(tokens());
        config
    };
    let server = TestServer::start(Arc::new(InMemoryStore::new()), config).await;
    use Some as T;
    for (method, path, token, expected) in [
        // No token or an unknown one: 401.
        ("POST", "/streams/Order-1", None, 401),
        ("GET", "/all", None, 401),
        ("GET", "/subscribe/all", None, 401),
        ("GET", "/admin/projections", None, 401),
        ("GET", "/metrics", None, 401),
        ("GET", "/streams/Order-1", T("not-a-token-at-all-0000"), 401),
        // Within scope.
        ("POST", "/streams/Order-1", T(WRITER), 201),
        ("GET", "/streams/Order-1", T(WRITER), 200),
        ("GET", "/categories/Order", T(WRITER), 200),
        ("GET", "/all", T(READER), 200),
        ("GET", "/categories/Customer", T(READER), 200),
        ("GET", "/admin/outbox", T(OPS), 404), // allowed; this server has no outbox
        // Outside it: 403.
        ("POST", "/streams/Customer-1", T(WRITER), 403),
        ("GET", "/streams/Customer-1", T(WRITER), 403),
        ("GET", "/all", T(WRITER), 403),
        ("GET", "/subscribe/all", T(WRITER), 403),
        ("GET", "/subscribe/categories/Customer", T(WRITER), 403),
        ("POST", "/streams/Order-1", T(READER), 403),
        ("GET", "/admin/projections", T(READER), 403),
        ("GET", "/metrics", T(WRITER), 403),
        ("GET", "/streams/Order-1", T(OPS), 403),
        // Open to all: probes and the API description.
        ("GET", "/health", None, 200),
        ("GET", "/ready", None, 200),
        ("GET", "/openapi.json", None, 200),
    ] {
        assert_eq!(
            status(&server, method, path, token).await,
            expected,
            "{method} {path} with {token:?}"
        );
    }
    // The answer says what is missing, and asks for a bearer token.
    let response = server.client.get(server.url("/all")).send().await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    let response = server
        .client
        .get(server.url("/all"))
        .bearer_auth(WRITER)
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    assert!(body["message"].as_str().unwrap().contains("$all"), "{body}");
    // A refused write wrote nothing.
    let (_, all) = {
        let r = server
            .client
            .get(server.url("/all"))
            .bearer_auth(READER)
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<serde_json::Value>().await.unwrap())
    };
    let streams: Vec<&str> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stream_id"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["Order-1"]);
    server.stop().await;
}

/// What one token learns from refusals stays within its scopes: an event
/// id or idempotency key used in a category it cannot read shows no stream,
/// and idempotency keys are per token, so none can take another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_reveal_nothing_outside_the_callers_scopes() {
    const SECRETS: &str = "secrets-token-0123456789";
    const DROP_BOX: &str = "drop-box-token-0123456789";
    const PAYMENTS: &str = "payments-token-0123456789";
    let tokens = Tokens::parse(&format!(
        r#"{{"tokens":[
            {{"name":"orders","token":"{WRITER}","read":["Order"],"write":["Order"]}},
            {{"name":"payments","token":"{PAYMENTS}","read":["Order"],"write":["Order"]}},
            {{"name":"secrets","token":"{SECRETS}","read":["Secret"],"write":["Secret"]}},
            {{"name":"drop-box","token":"{DROP_BOX}","write":["Secret"]}}
        ]}}"#
    ))
    .unwrap();
    let config = {
        let mut config = ServerConfig::default();
        config.tokens = Some(tokens);
        config
    };
    let server = TestServer::start(Arc::new(InMemoryStore::new()), config).await;
    let post = |token: &str, path: &str, body: &str, key: Option<&str>| {
        let mut request = server
            .client
            .post(server.url(path))
            .bearer_auth(token)
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    // An event id taken in a category the caller cannot read.
    let id = "0193a1b2-0000-7000-8000-00000000beef";
    let event = format!(r#"{{"event_id":"{id}","type":"Hidden"}}"#);
    assert_eq!(
        post(SECRETS, "/streams/Secret-plans", &event, None).await.0,
        201
    );
    let (status, answer) = post(WRITER, "/streams/Order-1", &event, None).await;
    assert_eq!(
        (status, &answer["error"]),
        (409, &serde_json::json!("idempotency_mismatch"))
    );
    assert!(!answer.to_string().contains("Secret"), "{answer}");
    // The owner of the category still sees where it is.
    let (status, answer) = post(SECRETS, "/streams/Secret-other", &event, None).await;
    assert_eq!(status, 409);
    assert!(
        answer["message"].as_str().unwrap().contains("Secret-plans"),
        "{answer}"
    );

    // One key, two tokens: two commands, each replayed only to its sender.
    let (status, first) = post(WRITER, "/streams/Order-1", r#"{"type":"A"}"#, Some("k-1")).await;
    assert_eq!(status, 201);
    let (status, other) = post(PAYMENTS, "/streams/Order-2", r#"{"type":"B"}"#, Some("k-1")).await;
    assert_eq!(status, 201, "{other}");
    assert_ne!(first["first_position"], other["first_position"]);
    assert_eq!(
        post(WRITER, "/streams/Order-1", r#"{"type":"A"}"#, Some("k-1")).await,
        (201, first)
    );
    let long_key = "k".repeat(256);
    let (status, _) = post(
        PAYMENTS,
        "/streams/Order-3",
        r#"{"type":"C"}"#,
        Some(&long_key),
    )
    .await;
    assert_eq!(status, 201, "a key of the full length is scoped too");

    // A key reused by a token that may write but not read the stream.
    assert_eq!(
        post(
            DROP_BOX,
            "/streams/Secret-box",
            r#"{"type":"D"}"#,
            Some("k-2")
        )
        .await
        .0,
        201
    );
    let (status, answer) = post(
        DROP_BOX,
        "/streams/Secret-box",
        r#"{"type":"E"}"#,
        Some("k-2"),
    )
    .await;
    assert_eq!(
        (status, &answer["error"]),
        (422, &serde_json::json!("idempotency_key_reused"))
    );
    assert!(!answer.to_string().contains("Secret-box"), "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("\"k-2\""),
        "{answer}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_time_out() {
    // A client that sends headers and then stalls its body is cut off
    // at the request timeout instead of holding a connection forever.
    let config = {
        let mut config = ServerConfig::default();
        config.request_timeout = Duration::from_millis(300);
        config
    };
    let server = TestServer::start(Arc::new(InMemoryStore::new()), config).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
    let rx =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    // Without the server's timeout this request would never end: the
    // outer deadline turns that into a failure instead of a hang.
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        server
            .client
            .post(server.url("/streams/Order-1"))
            .header("content-length", "100")
            .body(reqwest::Body::wrap_stream(rx))
            .send(),
    )
    .await
    .expect("the server cut the stalled request off")
    .unwrap();
    assert_eq!(response.status(), 408);
    drop(tx);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_appends_requests_and_subscriptions() {
    let handle = factline_server::install_recorder().unwrap();
    let store: Arc<dyn EventStore> =
        Arc::new(InstrumentedStore::new(Arc::new(InMemoryStore::new())));
    let server =
        TestServer::start_with(Server::new(store, ServerConfig::default()).with_metrics(handle))
            .await;
    for i in 0..5 {
        let (status, _) = server
            .post(
                &format!("/streams/Order-{i}"),
                r#"[{"type":"A"},{"type":"B"}]"#,
                &[],
            )
            .await;
        assert_eq!(status, 201);
    }
    let (status, _) = server
        .post(
            "/streams/Order-0",
            r#"{"type":"A"}"#,
            &[("Expected-Version", "0")],
        )
        .await;
    assert_eq!(status, 409);
    let _subscriber =
        common::SseReader::open(&server.client, &server.url("/subscribe/all?from=end"), None).await;
    // Made-up methods and paths add no series: they count as `other`.
    for (method, path) in [
        ("BREW", "/streams/Order-0"),
        ("FOO-1", "/made-up-path-1"),
        ("GET", "/made-up-path-2/x"),
        ("DELETE", "/made-up-path-3"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = server
            .client
            .request(method, server.url(path))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error());
    }
    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} is missing from\n{text}"))
    };
    // Other tests of this process share the recorder: compare with what
    // this one did at least.
    assert!(value(r#"factline_appends_total{outcome="written"}"#) >= 5.0);
    assert!(value(r#"factline_appends_total{outcome="rejected"}"#) >= 1.0);
    assert!(value("factline_appended_events_total") >= 10.0);
    assert!(value("factline_append_duration_seconds_count") >= 6.0);
    assert!(text.contains("factline_append_duration_seconds_bucket{le=\"0.001\"}"));
    assert_eq!(value("factline_events"), 10.0);
    assert!(value("factline_subscriptions") >= 1.0);
    assert!(
        value(r#"http_requests_total{method="POST",route="/streams/{stream_id}",status="201"}"#)
            >= 5.0
    );
    assert!(text.contains("http_request_duration_seconds_bucket"));
    for made_up in ["BREW", "FOO-1", "made-up-path", "unmatched"] {
        assert!(!text.contains(made_up), "{made_up} is a label in\n{text}");
    }
    assert!(
        value(r#"http_requests_total{method="other",route="/streams/{stream_id}",status="405"}"#)
            >= 1.0
    );
    assert!(value(r#"http_requests_total{method="other",route="other",status="404"}"#) >= 1.0);
    assert!(value(r#"http_requests_total{method="GET",route="other",status="404"}"#) >= 1.0);
    server.stop().await;
}
