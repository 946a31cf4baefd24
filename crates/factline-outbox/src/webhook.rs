//! The webhook sink: one HTTP POST per message.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;

use crate::{Message, Sink, SinkError};

/// POSTs each message's envelope to a URL. A 2xx answer acknowledges it;
/// a 4xx (but 408, 425 and 429) refuses it for good, so the relay parks
/// it; anything else (a 5xx, no answer within the timeout) is retried a few
/// times here, then left to the relay's backoff.
pub struct WebhookSink {
    url: reqwest::Url,
    client: reqwest::Client,
    attempts: u32,
    concurrency: usize,
}

impl WebhookSink {
    /// A sink posting to `url` (http or https), waiting at most `timeout` per request.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, SinkError> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| SinkError::permanent(format!("webhook URL {url:?}: {e}")).caused_by(e))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SinkError::permanent(format!(
                "webhook URL {url} must be http:// or https://"
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| SinkError::retryable(format!("webhook client: {e}")).caused_by(e))?;
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
        let mut last = SinkError::retryable(String::new());
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
                    let status = response.status();
                    let said = format!("{} answered {status}", self.url);
                    // A 4xx refuses this message itself: sending it again
                    // gets the same answer. Timeouts and rate limits pass.
                    let refused =
                        status.is_client_error() && !matches!(status.as_u16(), 408 | 425 | 429);
                    if refused {
                        return Err(SinkError::permanent(said));
                    }
                    last = SinkError::retryable(said);
                }
                Err(e) => {
                    last = SinkError::retryable(format!("POST {}: {e}", self.url)).caused_by(e)
                }
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
