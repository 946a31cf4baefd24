//! Where the relay publishes: a trait, so brokers can be added (Kafka
//! later), and the sinks that need no broker.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
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
    /// Opens `path` for appending, creating it readable by its owner only.
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
