//! What every single-writer backend shares: the job an append becomes, the
//! hand-over to the writer, and the group-commit drain of its queue.

use tokio::sync::{mpsc, oneshot};

use crate::{
    validate_append, AppendResult, EncodedEvent, EventData, ExpectedVersion, Limits, StorageError,
    StoreError, StreamId,
};

/// One validated append waiting for a backend's writer.
pub struct AppendJob {
    pub stream_id: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<EncodedEvent>,
    pub reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

/// Validates and serialises an append on the caller's task (keeping the
/// writer free for database work), queues it, and waits for its outcome.
/// `writer` names the writer in the error given when it has stopped.
pub async fn submit_append(
    queue: &mpsc::Sender<AppendJob>,
    limits: &Limits,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
    writer: &str,
) -> Result<AppendResult, StoreError> {
    let encoded = validate_append(&events, limits)?;
    let (reply, answer) = oneshot::channel();
    let job = AppendJob {
        stream_id: stream_id.clone(),
        expected,
        events: encoded,
        reply,
    };
    let gone = || StoreError::from(StorageError::new(format!("the {writer} has stopped")));
    queue.send(job).await.map_err(|_| gone())?;
    drop(events);
    answer.await.map_err(|_| gone())?
}

/// Takes `first` and whatever else is queued, up to `max_events` events:
/// what queued up while the previous commit was on its way goes into the
/// next transaction. That is the group commit.
pub fn drain_batch(
    first: AppendJob,
    queue: &mut mpsc::Receiver<AppendJob>,
    max_events: usize,
) -> Vec<AppendJob> {
    let mut queued_events = first.events.len();
    let mut batch = vec![first];
    while queued_events < max_events {
        match queue.try_recv() {
            Ok(job) => {
                queued_events += job.events.len();
                batch.push(job);
            }
            Err(_) => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(events: usize) -> AppendJob {
        let encoded = (0..events)
            .map(|_| EncodedEvent {
                event_id: crate::new_event_id(),
                event_type: "T".into(),
                data: "{}".into(),
                metadata: None,
            })
            .collect();
        AppendJob {
            stream_id: StreamId::new("Order-1").unwrap(),
            expected: ExpectedVersion::Any,
            events: encoded,
            reply: oneshot::channel().0,
        }
    }

    #[tokio::test]
    async fn a_batch_takes_what_is_queued_up_to_the_event_limit() {
        let (tx, mut rx) = mpsc::channel(16);
        for n in [3, 4, 5, 6] {
            tx.send(job(n)).await.unwrap();
        }
        let first = rx.recv().await.unwrap();
        // 3 + 4 + 5 reaches 10; the fourth job waits for the next batch.
        let batch = drain_batch(first, &mut rx, 10);
        let sizes: Vec<usize> = batch.iter().map(|j| j.events.len()).collect();
        assert_eq!(sizes, vec![3, 4, 5]);
        let rest = drain_batch(rx.recv().await.unwrap(), &mut rx, 10);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].events.len(), 6);
    }
}
