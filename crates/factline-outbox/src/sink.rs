//! Where the relay publishes: a trait, so brokers can be added (Kafka
//! later), and the sinks that need no broker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::Message;

/// Why a sink did not take a message; the relay keeps it and tries again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// A destination for outbox messages.
#[async_trait]
pub trait Sink: Send + Sync {
    /// For logs and status: `nats://…`, `https://…`, `stdout`.
    fn describe(&self) -> String;

    /// Publishes one wave and answers for each message, in order. A wave
    /// holds at most one message per stream, so a sink may publish them
    /// concurrently without breaking per-stream order. `Ok` means the
    /// destination acknowledged the message.
    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>>;
}

/// One JSON line per message: `{"subject", "key", "event"}`.
fn line(message: &Message) -> Vec<u8> {
    let text = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    let mut out = Vec::with_capacity(message.payload.len() + 64);
    out.extend_from_slice(b"{\"subject\":");
    out.extend_from_slice(text(&message.subject).as_bytes());
    out.extend_from_slice(b",\"key\":");
    out.extend_from_slice(text(&message.key).as_bytes());
    out.extend_from_slice(b",\"event\":");
    out.extend_from_slice(&message.payload);
    out.extend_from_slice(b"}\n");
    out
}

/// Writes the messages as JSON lines and flushes: each is delivered once
/// the kernel has it.
async fn write_lines(
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    messages: &[Message],
) -> Vec<Result<(), SinkError>> {
    let lines: Vec<u8> = messages.iter().flat_map(line).collect();
    let written = async {
        out.write_all(&lines).await?;
        out.flush().await
    }
    .await;
    messages
        .iter()
        .map(|_| {
            written
                .as_ref()
                .map_err(|e| SinkError(e.to_string()))
                .copied()
        })
        .collect()
}

/// Prints each message as a JSON line on standard output, for local use.
#[derive(Default)]
pub struct StdoutSink;

#[async_trait]
impl Sink for StdoutSink {
    fn describe(&self) -> String {
        "stdout".to_owned()
    }

    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        write_lines(&mut tokio::io::stdout(), messages).await
    }
}

/// Appends each message as a JSON line to a file (the demo's sink, and
/// tests that read what was delivered).
pub struct FileSink {
    path: PathBuf,
    file: tokio::sync::Mutex<tokio::fs::File>,
}

impl FileSink {
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|e| SinkError(format!("opening {}: {e}", path.display())))?;
        Ok(FileSink {
            path,
            file: tokio::sync::Mutex::new(file),
        })
    }
}

#[async_trait]
impl Sink for FileSink {
    fn describe(&self) -> String {
        format!("file://{}", self.path.display())
    }

    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        // Handed to the kernel before it counts as delivered: a killed
        // relay loses nothing it acknowledged.
        write_lines(&mut *self.file.lock().await, messages).await
    }
}

/// POSTs each message's envelope to a URL. A 2xx answer acknowledges it;
/// anything else (or no answer within the timeout) is retried a few times
/// here, then left to the relay's backoff.
pub struct WebhookSink {
    url: reqwest::Url,
    client: reqwest::Client,
    attempts: u32,
    concurrency: usize,
}

impl WebhookSink {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, SinkError> {
        let url =
            reqwest::Url::parse(url).map_err(|e| SinkError(format!("webhook URL {url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SinkError(format!(
                "webhook URL {url} must be http:// or https://"
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| SinkError(format!("webhook client: {e}")))?;
        Ok(WebhookSink {
            url,
            client,
            attempts: 3,
            concurrency: 16,
        })
    }

    /// Tries per message before giving it back to the relay (at least 1).
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    async fn post(&self, message: &Message) -> Result<(), SinkError> {
        let mut backoff = Duration::from_millis(100);
        let mut last = SinkError(String::new());
        for attempt in 1..=self.attempts {
            let mut request = self
                .client
                .post(self.url.clone())
                .header("content-type", "application/json")
                .header("idempotency-key", message.event_id.to_string())
                .header("factline-event-id", message.event_id.to_string())
                .header("factline-event-type", &message.event_type)
                .header("factline-stream-id", &message.stream_id)
                .header("factline-subject", &message.subject)
                .header("factline-position", message.position.to_string());
            if let Some(id) = &message.correlation_id {
                request = request.header("factline-correlation-id", id);
            }
            if let Some(id) = &message.causation_id {
                request = request.header("factline-causation-id", id);
            }
            match request.body(message.payload.clone()).send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => {
                    last = SinkError(format!("{} answered {}", self.url, response.status()))
                }
                Err(e) => last = SinkError(format!("POST {}: {e}", self.url)),
            }
            if attempt < self.attempts {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        Err(last)
    }
}

#[async_trait]
impl Sink for WebhookSink {
    fn describe(&self) -> String {
        self.url.to_string()
    }

    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        let posts: Vec<_> = messages.iter().map(|m| Box::pin(self.post(m))).collect();
        futures_util::stream::iter(posts)
            .buffered(self.concurrency)
            .collect()
            .await
    }
}
