//! Where the relay publishes: a trait, so brokers can be added (Kafka
//! later), and the sinks that need no broker.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use crate::Message;

/// Why a sink did not take a message. A retryable failure (the broker
/// down, a timeout, a 5xx) keeps the record pending and the relay tries
/// again with backoff; a permanent one (the destination refused this
/// message itself, such as a webhook answering 4xx) parks the record, so
/// one bad message does not hold its stream back forever.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    message: String,
    permanent: bool,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl SinkError {
    /// A failure that may pass: the record stays pending.
    pub fn retryable(message: impl Into<String>) -> Self {
        SinkError {
            message: message.into(),
            permanent: false,
            source: None,
        }
    }

    /// The destination refused this message for good: the record is parked.
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError {
            permanent: true,
            ..SinkError::retryable(message)
        }
    }

    /// Keeps the error that caused this one.
    pub fn caused_by(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        !self.permanent
    }

    /// What failed, in words.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl PartialEq for SinkError {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message && self.permanent == other.permanent
    }
}

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
    // One write for the wave: every message gets its outcome.
    let outcome = written.map_err(|e| SinkError::retryable(e.to_string()).caused_by(e));
    messages.iter().map(|_| outcome.clone()).collect()
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
    /// Opens `path` for appending, creating it readable by its owner only.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(|e| {
                SinkError::retryable(format!("opening {}: {e}", path.display())).caused_by(e)
            })?;
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
