//! What every single-writer backend shares: the job an append becomes, the
//! hand-over to the writer, and the group-commit drain of its queue.

use tokio::sync::{mpsc, oneshot};

use crate::backend::{validate_append, EncodedEvent};
use crate::{
    AppendResult, Appended, CommandKey, EventData, ExpectedVersion, Limits, StorageError,
    StoreError, StreamId,
};

/// One validated append waiting for a backend's writer.
pub struct AppendJob {
    /// The stream appended to.
    pub stream_id: StreamId,
    /// The version the append expects the stream at.
    pub expected: ExpectedVersion,
    /// The validated events, in order.
    pub events: Vec<EncodedEvent>,
    /// Set for a command's append: its key is stored with the events.
    pub command: Option<CommandKey>,
    /// Where the writer answers.
    pub reply: oneshot::Sender<Result<Appended, StoreError>>,
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
    match submit(queue, limits, stream_id, expected, events, None, writer).await? {
        Appended::Written(result) => Ok(result),
        // Only keyed appends replay a record.
        Appended::Replayed(record) => Ok(record.result),
    }
}

/// [`submit_append`] for a command's append: `command` is stored with the
/// events, or the record already stored under it comes back.
pub async fn submit_command(
    queue: &mpsc::Sender<AppendJob>,
    limits: &Limits,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
    command: &CommandKey,
    writer: &str,
) -> Result<Appended, StoreError> {
    command.validate()?;
    let command = Some(command.clone());
    submit(queue, limits, stream_id, expected, events, command, writer).await
}

async fn submit(
    queue: &mpsc::Sender<AppendJob>,
    limits: &Limits,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
    command: Option<CommandKey>,
    writer: &str,
) -> Result<Appended, StoreError> {
    let encoded = validate_append(&events, limits)?;
    let (reply, answer) = oneshot::channel();
    let job = AppendJob {
        stream_id: stream_id.clone(),
        expected,
        events: encoded,
        command,
        reply,
    };
    let gone = || StoreError::from(StorageError::new(format!("the {writer} has stopped")));
    queue.send(job).await.map_err(|_| gone())?;
    drop(events);
    answer.await.map_err(|_| gone())?
}

/// The record a keyed job's append leaves, from what the writer knows.
pub fn new_command_record(
    job: &AppendJob,
    command: &CommandKey,
    result: &AppendResult,
    recorded_at: chrono::DateTime<chrono::Utc>,
) -> crate::CommandRecord {
    crate::CommandRecord {
        key: command.key.clone(),
        fingerprint: command.fingerprint.clone(),
        result: result.clone(),
        event_ids: job.events.iter().map(|e| e.event_id).collect(),
        recorded_at,
    }
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
            command: None,
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
