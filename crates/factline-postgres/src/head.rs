//! The head listener: LISTENs for commits announced by any process and
//! raises this process's head watch, which wakes live subscriptions.
//!
//! Notifications sent while the listener is disconnected are lost, so after
//! every (re)connect it reads the head position once: whatever was committed
//! in between then wakes subscribers, which read from where they stopped.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::schema::quote_ident;
use crate::sql::pg_error;

pub(crate) struct Listener {
    pub pg_config: tokio_postgres::Config,
    pub channel: String,
    pub head_sql: String,
    pub head: Arc<watch::Sender<u64>>,
}

impl Listener {
    /// Runs until `shutdown` fires or its sender is dropped.
    pub async fn run(self, mut shutdown: oneshot::Receiver<()>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            tokio::select! {
                ended = self.listen() => {
                    match ended {
                        // The connection was up; start the backoff afresh.
                        Ok(()) => backoff = Duration::from_millis(50),
                        Err(e) => {
                            tracing::warn!(error = %e, "head listener cannot connect; retrying");
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                }
                _ = &mut shutdown => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = &mut shutdown => return,
            }
        }
    }

    /// Connects, LISTENs, and raises the head on every notification until
    /// the connection is lost (`Ok`) or cannot be made (`Err`).
    async fn listen(&self) -> Result<(), factline_core::StoreError> {
        let err = |e| pg_error("listening for commits", e);
        let (client, mut connection) = self.pg_config.connect(NoTls).await.map_err(err)?;
        let (notes_tx, mut notes) = mpsc::unbounded_channel();
        // The connection must be driven while the client talks; it hands
        // notifications over and ends the channel when it closes.
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(note)) => {
                        if notes_tx.send(note.payload().to_string()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "head listener connection lost");
                        break;
                    }
                }
            }
        });
        let setup = async {
            client
                .batch_execute(&format!("LISTEN {}", quote_ident(&self.channel)))
                .await?;
            client.query_one(&self.head_sql, &[]).await
        }
        .await;
        let head = match setup {
            Ok(row) => row.get::<_, i64>(0) as u64,
            Err(e) => {
                driver.abort();
                return Err(err(e));
            }
        };
        self.raise(head);
        while let Some(payload) = notes.recv().await {
            match payload.parse::<u64>() {
                Ok(position) => self.raise(position),
                Err(_) => tracing::warn!(%payload, "ignoring a malformed commit notification"),
            }
        }
        drop(client);
        Ok(())
    }

    fn raise(&self, position: u64) {
        self.head.send_if_modified(|h| {
            let raised = position > *h;
            *h = (*h).max(position);
            raised
        });
    }
}
