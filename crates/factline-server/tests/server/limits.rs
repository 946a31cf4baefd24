//! Limits a server exposed to careless or hostile clients keeps: a
//! deadline for headers, caps on connections and subscriptions, and one
//! JSON error shape for every refusal, the HTTP parser's own included.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use factline_core::InMemoryStore;
use factline_server::{BrowserPolicy, ConnectionLimits, Server, ServerConfig, Tokens};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` as raw bytes and reads until the server closes:
/// the status and the JSON body.
async fn raw(server: &TestServer, request: &[u8]) -> (u16, Value, String) {
    let mut stream = TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap();
    // The server may answer and close before it has read everything.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .ok();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, json, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_json_the_parsers_own_included() {
    let server = TestServer::start(Arc::new(InMemoryStore::new()), ServerConfig::default()).await;
    let long_uri = format!(
        "GET /all?{} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
        "a".repeat(70_000)
    );
    let big_header = format!(
        "GET /all HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: {}\r\n\r\n",
        "b".repeat(600_000)
    );
    let many_headers = format!(
        "GET /all HTTP/1.1\r\nhost: 127.0.0.1\r\n{}\r\n",
        (0..200)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>()
    );
    for (request, status, code) in [
        (&b"GARBAGE\r\n\r\n"[..], 400, "invalid_request"),
        (long_uri.as_bytes(), 414, "uri_too_long"),
        (big_header.as_bytes(), 431, "headers_too_large"),
        (many_headers.as_bytes(), 431, "headers_too_large"),
        (
            b"GET /streams/%FF%FE HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
            400,
            "invalid_request",
        ),
        (
            b"DELETE /all HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
            405,
            "method_not_allowed",
        ),
    ] {
        let (got, body, text) = raw(&server, request).await;
        assert_eq!(
            got,
            status,
            "{:.80}: {text:.300}",
            String::from_utf8_lossy(request)
        );
        assert_eq!(body["error"], code, "{text:.300}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{text:.300}"
        );
        assert!(
            text.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{text:.300}"
        );
    }
    let (_, _, text) = raw(
        &server,
        b"DELETE /all HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(text.to_ascii_lowercase().contains("allow: get"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_its_headers_is_closed() {
    let config = {
        let mut config = ServerConfig::default();
        config.connections =
            ConnectionLimits::default().with_header_read_timeout(Duration::from_millis(300));
        config
    };
    let server = TestServer::start(Arc::new(InMemoryStore::new()), config).await;
    let mut stream = TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the server kept a connection without headers open"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_answered_503_until_one_closes() {
    let config = {
        let mut config = ServerConfig::default();
        config.connections = ConnectionLimits::default().with_max_connections(3);
        config
    };
    let handle = factline_server::install_recorder().unwrap();
    let server = TestServer::start_with(
        Server::new(Arc::new(InMemoryStore::new()), config).with_metrics(handle),
    )
    .await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(&address).await.unwrap());
    }
    // Once the server has taken the idle ones, the next is answered 503;
    // until then a probe is served (and closes).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body, text) = raw(
            &server,
            b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
        )
        .await;
        if status == 503 {
            assert_eq!(body["error"], "unavailable", "{text}");
            break;
        }
        assert_eq!(status, 200, "{text}");
        assert!(
            std::time::Instant::now() < deadline,
            "the cap never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(idle.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = raw(
            &server,
            b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a slot never came free"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(idle);
    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    assert!(
        text.contains("factline_http_connections_refused_total"),
        "{text}"
    );
    assert!(text.contains("factline_http_connections "), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_capped_in_all_and_per_token() {
    const A: &str = "token-a-0123456789abcdef";
    const B: &str = "token-b-0123456789abcdef";
    let tokens = Tokens::parse(&format!(
        r#"{{"tokens":[{{"name":"a","token":"{A}","read":["*"],"admin":["*"]}},{{"name":"b","token":"{B}","read":["*"]}}]}}"#
    ))
    .unwrap();
    let config = {
        let mut config = ServerConfig::default();
        config.tokens = Some(tokens);
        config.max_subscriptions = 3;
        config.max_subscriptions_per_token = 2;
        config
    };
    let handle = factline_server::install_recorder().unwrap();
    let server = TestServer::start_with(
        Server::new(Arc::new(InMemoryStore::new()), config).with_metrics(handle),
    )
    .await;
    let open = |token: &'static str| {
        let request = server
            .client
            .get(server.url("/subscribe/all"))
            .bearer_auth(token);
        async move { request.send().await.unwrap() }
    };
    let a1 = open(A).await;
    let a2 = open(A).await;
    assert_eq!((a1.status().as_u16(), a2.status().as_u16()), (200, 200));
    let a3 = open(A).await;
    assert_eq!(a3.status(), 429);
    assert_eq!(a3.json::<Value>().await.unwrap()["error"], "too_many");
    let b1 = open(B).await;
    assert_eq!(b1.status(), 200);
    let b2 = open(B).await;
    assert_eq!(b2.status(), 503, "the server is full");
    drop(a1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = open(B).await;
        if again.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a closed subscription kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .bearer_auth(A)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in ["token", "server"] {
        let series = format!("factline_subscriptions_refused_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    server.stop().await;
}

/// A page on another site cannot use a local server through a visitor's
/// browser: no form or text posts, no foreign origin, no foreign name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_cannot_be_used_against_the_server() {
    let config = {
        let mut config = ServerConfig::default();
        config.browsers = BrowserPolicy::default()
            .allow_host("events.internal")
            .allow_origin("https://ops.example.com");
        config
    };
    let server = TestServer::start(Arc::new(InMemoryStore::new()), config).await;
    let plain = reqwest::Client::new();
    let event = r#"{"type":"OrderPlaced"}"#;
    let post = |content_type: Option<&str>, path: &str| {
        let mut request = plain.post(server.url(path)).body(event);
        if let Some(t) = content_type {
            request = request.header("content-type", t);
        }
        async move { request.send().await.unwrap() }
    };
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
    ] {
        for path in ["/streams/Order-1", "/admin/projections/p/pause"] {
            let answer = post(content_type, path).await;
            assert_eq!(answer.status(), 415, "{content_type:?} {path}");
            assert_eq!(
                answer.json::<Value>().await.unwrap()["error"],
                "unsupported_media_type"
            );
        }
    }
    let (_, all) = server.get("/all").await;
    assert_eq!(all["events"], serde_json::json!([]), "nothing was written");
    assert_eq!(
        post(Some("application/json; charset=utf-8"), "/streams/Order-1")
            .await
            .status(),
        201
    );

    let own = server.base.clone();
    let host = own.trim_start_matches("http://").to_owned();
    let port = host.rsplit(':').next().unwrap().to_owned();
    for (origin, status) in [
        ("http://evil.example", 403),
        ("null", 403),
        (own.as_str(), 200),
        ("https://ops.example.com", 200),
    ] {
        let answer = plain
            .get(server.url("/all"))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status, "Origin {origin}");
    }
    let answer = plain
        .post(server.url("/streams/Order-1"))
        .header("origin", "http://evil.example")
        .header("content-type", "application/json")
        .body(event)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 403);
    for (name, status) in [
        (format!("evil.example:{port}"), 403),
        (format!("localhost:{port}"), 200),
        (format!("events.internal:{port}"), 200),
        (host.clone(), 200),
    ] {
        let request = format!("GET /all HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
        let (got, body, text) = raw(&server, request.as_bytes()).await;
        assert_eq!(got, status, "Host {name}: {text:.300}");
        if status == 403 {
            assert_eq!(body["error"], "forbidden");
        }
    }
    // The dashboard's own page and its data calls are same-origin.
    let page = plain
        .get(server.url("/"))
        .header("origin", own.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    server.stop().await;
}
