//! The NATS JetStream sink (O3).

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use async_trait::async_trait;

use crate::{Message, Sink, SinkError};

/// Where and how the relay publishes to JetStream.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NatsSinkConfig {
    /// `nats://host:port`.
    pub url: String,
    /// The JetStream stream to create if missing (`None`: it must exist).
    pub stream: Option<String>,
    /// The subjects that stream captures.
    pub subjects: Vec<String>,
    /// JetStream drops a re-publish of an event id within this window.
    pub duplicate_window: Duration,
    /// How long a publish waits for JetStream's acknowledgement.
    pub ack_timeout: Duration,
}

impl NatsSinkConfig {
    /// The defaults for the server at `url`: a stream `factline` capturing
    /// `factline.>`, a two-minute duplicate window.
    pub fn new(url: impl Into<String>) -> Self {
        NatsSinkConfig {
            url: url.into(),
            stream: Some("factline".to_owned()),
            subjects: vec!["factline.>".to_owned()],
            duplicate_window: Duration::from_secs(120),
            ack_timeout: Duration::from_secs(5),
        }
    }
}

/// Publishes each message on its subject with the event id as
/// `Nats-Msg-Id` (JetStream's duplicate window then drops a re-publish),
/// the type, stream, position, correlation and causation ids as headers,
/// and the JSON envelope as payload.
pub struct NatsSink {
    config: NatsSinkConfig,
    jetstream: jetstream::Context,
    /// Whether the stream is known to exist (checked again after a failure).
    stream_ready: tokio::sync::Mutex<bool>,
}

impl NatsSink {
    /// Connects without waiting for the server: a broker that is down when
    /// the relay starts is an outage like any other, retried with backoff.
    pub async fn connect(config: NatsSinkConfig) -> Result<Self, SinkError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * 2u64.pow(attempts.min(5) as u32)).min(2_000))
            })
            .connect(config.url.as_str())
            .await
            .map_err(|e| {
                SinkError::retryable(format!("connecting to {}: {e}", config.url)).caused_by(e)
            })?;
        let mut jetstream = jetstream::new(client);
        jetstream.set_timeout(config.ack_timeout);
        Ok(NatsSink {
            config,
            jetstream,
            stream_ready: tokio::sync::Mutex::new(false),
        })
    }

    async fn ensure_stream(&self) -> Result<(), SinkError> {
        let mut ready = self.stream_ready.lock().await;
        if *ready {
            return Ok(());
        }
        if let Some(name) = &self.config.stream {
            self.jetstream
                .get_or_create_stream(jetstream::stream::Config {
                    name: name.clone(),
                    subjects: self.config.subjects.clone(),
                    duplicate_window: self.config.duplicate_window,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    SinkError::retryable(format!("JetStream stream {name:?}: {e}")).caused_by(e)
                })?;
        }
        *ready = true;
        Ok(())
    }

    fn publication(message: &Message) -> PublishMessage {
        let mut publish = PublishMessage::build()
            .message_id(message.event_id.to_string())
            .header("Factline-Event-Type", message.event_type.as_str())
            .header("Factline-Stream-Id", message.stream_id.as_str())
            .header("Factline-Position", message.position.to_string().as_str())
            .header("Factline-Key", message.key.as_str());
        if let Some(id) = &message.correlation_id {
            publish = publish.header("Factline-Correlation-Id", id.as_str());
        }
        if let Some(id) = &message.causation_id {
            publish = publish.header("Factline-Causation-Id", id.as_str());
        }
        publish.payload(message.payload.clone())
    }
}

#[async_trait]
impl Sink for NatsSink {
    fn describe(&self) -> String {
        self.config.url.clone()
    }

    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        if let Err(e) = self.ensure_stream().await {
            return messages.iter().map(|_| Err(e.clone())).collect();
        }
        // Send the whole wave, then collect the acknowledgements.
        let mut acks = Vec::with_capacity(messages.len());
        for message in messages {
            acks.push(
                self.jetstream
                    .send_publish(message.subject.clone(), Self::publication(message))
                    .await,
            );
        }
        let mut results = Vec::with_capacity(messages.len());
        for ack in acks {
            results.push(match ack {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| {
                    SinkError::retryable(format!("JetStream did not acknowledge: {e}")).caused_by(e)
                }),
                Err(e) => Err(SinkError::retryable(format!(
                    "publishing to {}: {e}",
                    self.config.url
                ))
                .caused_by(e)),
            });
        }
        if results.iter().any(Result::is_err) {
            // A restarted or reconfigured server may have lost the stream:
            // look again before the next wave.
            *self.stream_ready.lock().await = false;
        }
        results
    }
}
