//! A server on a free loopback port, and a Server-Sent Events reader.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use factline_core::EventStore;
use factline_server::{Server, ServerConfig};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(store: Arc<dyn EventStore>, config: ServerConfig) -> Self {
        Self::start_with(Server::new(store, config)).await
    }

    pub async fn start_with(server: Server) -> Self {
        let (stop, stopped) = watch::channel(false);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(
            server
                .with_shutdown(stopped.clone())
                .serve(listener, factline_server::stopped_by(stopped)),
        );
        TestServer {
            base,
            client: json_client(),
            stop,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = self.client.post(self.url(path)).body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Stops the server; it must finish, open subscriptions included.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops within 10 s")
            .unwrap()
            .unwrap();
    }
}

/// A client that sends `Content-Type: application/json`, as the server
/// requires of writes.
pub fn json_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::CONTENT_TYPE,
        reqwest::header::HeaderValue::from_static("application/json"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

pub use factline_server::sse::{SseMessage, SseParser};

/// Reads an event stream message by message; comment lines (heartbeats)
/// are counted.
pub struct SseReader {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    parser: SseParser,
    pub comments: usize,
}

impl SseReader {
    pub async fn open(client: &reqwest::Client, url: &str, last_event_id: Option<u64>) -> Self {
        let mut request = client.get(url);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "subscribing to {url}");
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        SseReader {
            body: response.bytes_stream().boxed(),
            parser: SseParser::default(),
            comments: 0,
        }
    }

    /// The next message, or `None` when the stream ends.
    pub async fn next(&mut self) -> Option<SseMessage> {
        loop {
            if let Some(message) = self.parser.next_message() {
                self.comments = self.parser.comments;
                return Some(message);
            }
            self.comments = self.parser.comments;
            match self.body.next().await {
                Some(Ok(chunk)) => self.parser.push(&chunk),
                _ => return None,
            }
        }
    }

    /// The next event, parsed; panics after `within` without one.
    pub async fn event(&mut self, within: Duration) -> Value {
        let message = tokio::time::timeout(within, self.next())
            .await
            .expect("an event arrives in time")
            .expect("the stream is still open");
        assert_eq!(message.event, None, "a plain event, not {message:?}");
        let event: Value =
            serde_json::from_str(&message.data).unwrap_or_else(|e| panic!("{e}: {message:?}"));
        assert_eq!(
            message.id.as_deref(),
            Some(event["position"].to_string().as_str()),
            "the SSE id is the global position"
        );
        event
    }
}
