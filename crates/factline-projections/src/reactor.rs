//! Reactors (P7): side effects of events (an e-mail, a call to another
//! service). Unlike projections they run on live events only: a new
//! reactor starts at the head of the log, and nothing replays history into
//! it. Each keeps its own checkpoint, saved after every effect, so a
//! restart repeats at most the effect that was running when the process
//! died — with the same idempotency key, for the receiver to recognise.

use std::sync::Arc;

use async_trait::async_trait;
use factline_core::{EventStore, RecordedEvent, StreamFilter};
use tokio::sync::watch;

use crate::{ApplyError, ProjectionError};

/// A side effect of events.
#[async_trait]
pub trait Reactor: Send + Sync + 'static {
    /// Unique among the reactors and projections sharing a checkpoint table.
    fn name(&self) -> &str;

    /// Runs the effect of one event. `key` is the same every time this
    /// reactor sees this event: hand it to the receiving system as an
    /// idempotency key, since after a crash an effect may run again.
    async fn react(&self, event: &RecordedEvent, key: &str) -> Result<(), ApplyError>;
}

/// Where reactor checkpoints are kept.
#[async_trait]
pub trait Checkpoints: Send + Sync {
    /// The checkpoint of the reactor `name`, if it has one.
    async fn load(&self, name: &str) -> Result<Option<u64>, ProjectionError>;
    /// Stores the checkpoint of the reactor `name`.
    async fn save(&self, name: &str, position: u64) -> Result<(), ProjectionError>;
}

/// The idempotency key of `event` for the reactor `name`.
pub fn effect_key(name: &str, event: &RecordedEvent) -> String {
    format!("{name}:{}", event.event_id)
}

/// Runs one reactor on live events until told to stop.
pub struct ReactorRunner<R, C> {
    store: Arc<dyn EventStore>,
    reactor: R,
    checkpoints: C,
    progress: watch::Sender<u64>,
}

impl<R: Reactor, C: Checkpoints> ReactorRunner<R, C> {
    /// A runner of `reactor` over `store`, with its checkpoint in `checkpoints`.
    pub fn new(store: Arc<dyn EventStore>, reactor: R, checkpoints: C) -> Self {
        ReactorRunner {
            store,
            reactor,
            checkpoints,
            progress: watch::channel(0).0,
        }
    }

    /// The checkpoint after every effect.
    pub fn watch_checkpoint(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// The reactor it runs.
    pub fn reactor(&self) -> &R {
        &self.reactor
    }

    /// Reacts to each event after the checkpoint (a first run starts at
    /// the head) until `stop` turns true. A failed effect stops the runner;
    /// its event is the first one reacted to next time.
    pub async fn run(&mut self, mut stop: watch::Receiver<bool>) -> Result<(), ProjectionError> {
        let name = self.reactor.name().to_owned();
        crate::validate_name(&name)?;
        let checkpoint = match self.checkpoints.load(&name).await? {
            Some(checkpoint) => checkpoint,
            None => {
                // History before the reactor existed is not its business.
                let head = self.store.head_position().await?;
                self.checkpoints.save(&name, head).await?;
                head
            }
        };
        self.progress.send_replace(checkpoint);
        let mut subscription = self.store.subscribe(StreamFilter::All, checkpoint + 1);
        loop {
            if *stop.borrow_and_update() {
                return Ok(());
            }
            let event = tokio::select! {
                event = subscription.next() => event?,
                _ = stop.changed() => continue,
            };
            let key = effect_key(&name, &event);
            self.reactor
                .react(&event, &key)
                .await
                .map_err(|refusal| ProjectionError::Apply {
                    projection: name.clone(),
                    position: event.position,
                    message: refusal.into_message(),
                })?;
            self.checkpoints.save(&name, event.position).await?;
            self.progress.send_replace(event.position);
        }
    }
}
