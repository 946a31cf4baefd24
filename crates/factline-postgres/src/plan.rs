//! Deciding a batch of appends in memory before anything is written: the
//! PostgreSQL writer's plan, a pure function of the batch and what is
//! stored, so its rules are tested without a database (see the tests
//! below).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use factline_core::backend::writer_queue::{new_command_record, AppendJob};
use factline_core::backend::{
    resolve_command, resolve_duplicates, EncodedEvent, ExistingEvent, StoredContent,
};
use factline_core::{AppendResult, Appended, CommandRecord, StoreError, StreamId};
use uuid::Uuid;

use crate::writer::RELATIVE_STREAM_BASE;

/// The last position and stream number handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub last_position: u64,
    pub last_stream_no: i64,
}

/// What one transaction writes, column by column, ready for `unnest`.
pub(crate) struct EventColumns<'a> {
    pub position: Vec<i64>,
    pub stream_no: Vec<i64>,
    pub version: Vec<i64>,
    pub category: Vec<&'a str>,
    pub event_id: Vec<Uuid>,
    pub event_type: Vec<&'a str>,
    pub data: Vec<&'a str>,
    pub metadata: Vec<Option<&'a str>>,
}

impl EventColumns<'_> {
    fn with_capacity(n: usize) -> Self {
        EventColumns {
            position: Vec::with_capacity(n),
            stream_no: Vec::with_capacity(n),
            version: Vec::with_capacity(n),
            category: Vec::with_capacity(n),
            event_id: Vec::with_capacity(n),
            event_type: Vec::with_capacity(n),
            data: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
        }
    }
}

#[derive(Default)]
pub(crate) struct NewStreams<'a> {
    pub stream_no: Vec<i64>,
    pub stream_id: Vec<&'a str>,
    pub category: Vec<&'a str>,
}

pub(crate) struct Plan<'a> {
    pub outcomes: Vec<Result<Appended, StoreError>>,
    /// Command records to store (only in plans made with [`Commands`]).
    pub commands: Vec<CommandRecord>,
    pub events: EventColumns<'a>,
    pub new_streams: NewStreams<'a>,
    /// Every stream the plan writes to: (id, number, version after).
    pub streams: Vec<(&'a str, i64, u64)>,
    pub head: Head,
}

impl Plan<'_> {
    /// For a plan made relative to the head: how many events and new
    /// streams it adds.
    pub(crate) fn relative_size(&self) -> (i64, i64) {
        (
            self.head.last_position as i64,
            self.head.last_stream_no - RELATIVE_STREAM_BASE,
        )
    }
}

/// The plan needs to know which of the batch's event ids are stored.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NeedStoredIds;

struct StreamState<'a> {
    category: &'a str,
    stream_no: i64,
    version: u64,
    /// Created by this batch.
    created: bool,
}

/// The command records stored under a batch's keys, as looked up under the
/// head lock, and the time that decides which are live.
pub(crate) struct Commands {
    pub stored: HashMap<String, CommandRecord>,
    pub now: DateTime<Utc>,
    pub retention: Duration,
}

/// Decides every append of the batch in memory, in queue order, as if they
/// ran one after another: each sees the versions the earlier ones produced,
/// and the command keys the earlier ones stored.
///
/// `streams` holds the stored state of the batch's streams; `stored` is
/// where the batch's event ids are stored, when that has been looked up;
/// `commands` the batch's stored command keys, when they have been looked
/// up. Asks for them (`Err(NeedStoredIds)`) when an append cannot be
/// decided without them.
pub(crate) fn plan_batch<'a>(
    batch: &'a [AppendJob],
    skip: &[bool],
    streams: &HashMap<String, (i64, u64)>,
    stored: Option<&HashMap<Uuid, ExistingEvent>>,
    commands: Option<&Commands>,
    head: Head,
) -> Result<Plan<'a>, NeedStoredIds> {
    let mut states: HashMap<&'a str, StreamState<'a>> = HashMap::new();
    // Events this batch writes, by id: a later append in the batch that
    // repeats them is a retry of an earlier one.
    let total_events = batch.iter().map(|j| j.events.len()).sum();
    let mut written: HashMap<Uuid, (&StreamId, u64, u64, &EncodedEvent)> =
        HashMap::with_capacity(total_events);
    let mut events = EventColumns::with_capacity(total_events);
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut new_commands: Vec<CommandRecord> = Vec::new();
    let mut next = head;
    for (index, job) in batch.iter().enumerate() {
        if skip.get(index) == Some(&true) {
            // Refused by an inline projection: the caller fills in why.
            outcomes.push(Err(StoreError::invalid_input("skipped")));
            continue;
        }
        if let Some(command) = &job.command {
            let commands = commands.ok_or(NeedStoredIds)?;
            let earlier = new_commands.iter().rev().find(|r| r.key == command.key);
            let stored = earlier.or_else(|| commands.stored.get(&command.key));
            match resolve_command(command, stored, commands.now, commands.retention) {
                Ok(Some(record)) => {
                    outcomes.push(Ok(Appended::Replayed(record)));
                    continue;
                }
                Ok(None) => {}
                Err(rejection) => {
                    outcomes.push(Err(rejection));
                    continue;
                }
            }
        }
        let stream = job.stream_id.as_str();
        let current = states
            .get(stream)
            .map(|s| s.version)
            .or_else(|| streams.get(stream).map(|&(_, version)| version))
            .unwrap_or(0);
        let satisfied = job.expected.is_satisfied_by(current);
        let repeats_batch = job.events.iter().any(|e| written.contains_key(&e.event_id));
        if stored.is_some() || !satisfied || repeats_batch {
            // Maybe a retry of an append that already happened (S3).
            let stored = stored.ok_or(NeedStoredIds)?;
            let ids: Vec<Uuid> = job.events.iter().map(|e| e.event_id).collect();
            let existing: Vec<Option<ExistingEvent>> = ids
                .iter()
                .map(|id| match written.get(id) {
                    Some(&(stream_id, version, position, event)) => Some(ExistingEvent {
                        stream_id: stream_id.clone(),
                        version,
                        position,
                        content: StoredContent::of(event),
                    }),
                    None => stored.get(id).cloned(),
                })
                .collect();
            match resolve_duplicates(
                &job.stream_id,
                job.expected,
                current,
                &job.events,
                &existing,
            ) {
                Ok(Some(original)) => {
                    outcomes.push(Ok(Appended::Written(original)));
                    continue;
                }
                Err(rejection) => {
                    outcomes.push(Err(rejection));
                    continue;
                }
                Ok(None) if !satisfied => {
                    outcomes.push(Err(StoreError::Conflict {
                        stream_id: job.stream_id.clone(),
                        expected: job.expected,
                        actual: current,
                    }));
                    continue;
                }
                Ok(None) => {}
            }
        }
        let state = states
            .entry(stream)
            .or_insert_with(|| match streams.get(stream) {
                Some(&(stream_no, version)) => StreamState {
                    category: job.stream_id.category(),
                    stream_no,
                    version,
                    created: false,
                },
                None => {
                    next.last_stream_no += 1;
                    StreamState {
                        category: job.stream_id.category(),
                        stream_no: next.last_stream_no,
                        version: 0,
                        created: true,
                    }
                }
            });
        let category = job.stream_id.category();
        let first_version = state.version + 1;
        let first_position = next.last_position + 1;
        for event in &job.events {
            state.version += 1;
            next.last_position += 1;
            events.position.push(next.last_position as i64);
            events.stream_no.push(state.stream_no);
            events.version.push(state.version as i64);
            events.category.push(category);
            events.event_id.push(event.event_id);
            events.event_type.push(&event.event_type);
            events.data.push(&event.data);
            events.metadata.push(event.metadata.as_deref());
            written.insert(
                event.event_id,
                (&job.stream_id, state.version, next.last_position, event),
            );
        }
        let result = AppendResult {
            stream_id: job.stream_id.clone(),
            first_version,
            last_version: state.version,
            first_position,
            last_position: next.last_position,
        };
        if let (Some(command), Some(commands)) = (&job.command, commands) {
            new_commands.push(new_command_record(job, command, &result, commands.now));
        }
        outcomes.push(Ok(Appended::Written(result)));
    }
    let mut new_streams = NewStreams::default();
    let mut touched = Vec::with_capacity(states.len());
    for (stream, state) in &states {
        touched.push((*stream, state.stream_no, state.version));
        if state.created {
            new_streams.stream_no.push(state.stream_no);
            new_streams.stream_id.push(stream);
            new_streams.category.push(state.category);
        }
    }
    Ok(Plan {
        outcomes,
        commands: new_commands,
        events,
        new_streams,
        streams: touched,
        head: next,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use factline_core::{CommandKey, ExpectedVersion};
    use proptest::prelude::*;

    use super::*;

    fn event(n: u128) -> EncodedEvent {
        EncodedEvent {
            event_id: Uuid::from_u128(n),
            event_type: "E".into(),
            data: format!("{{\"n\":{n}}}"),
            metadata: None,
        }
    }

    fn job(stream: &str, expected: ExpectedVersion, ids: &[u128]) -> AppendJob {
        AppendJob {
            stream_id: StreamId::new(stream).unwrap(),
            expected,
            events: ids.iter().map(|&n| event(n)).collect(),
            command: None,
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    fn head(last_position: u64, last_stream_no: i64) -> Head {
        Head {
            last_position,
            last_stream_no,
        }
    }

    fn written(outcome: &Result<Appended, StoreError>) -> &AppendResult {
        match outcome {
            Ok(Appended::Written(result)) => result,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    #[test]
    fn appends_of_a_batch_see_the_versions_the_earlier_ones_made() {
        let batch = [
            job("Invoice-1", ExpectedVersion::NoStream, &[1, 2]),
            job("Invoice-2", ExpectedVersion::Any, &[3]),
            job("Invoice-1", ExpectedVersion::Exact(2), &[4]),
            job("Ticket-9", ExpectedVersion::Exact(5), &[5]),
        ];
        let stored = HashMap::from([("Ticket-9".to_owned(), (7, 5))]);
        let plan = plan_batch(&batch, &[], &stored, None, None, head(40, 7)).unwrap();
        let results: Vec<_> = plan.outcomes.iter().map(written).collect();
        let spans: Vec<_> = results
            .iter()
            .map(|r| {
                (
                    r.first_version,
                    r.last_version,
                    r.first_position,
                    r.last_position,
                )
            })
            .collect();
        assert_eq!(
            spans,
            [
                (1, 2, 41, 42),
                (1, 1, 43, 43),
                (3, 3, 44, 44),
                (6, 6, 45, 45)
            ]
        );
        assert_eq!(plan.events.position, [41, 42, 43, 44, 45]);
        assert_eq!(plan.events.version, [1, 2, 1, 3, 6]);
        // New streams are numbered after the last one; a stored one keeps its number.
        assert_eq!(plan.events.stream_no, [8, 8, 9, 8, 7]);
        let mut created = plan.new_streams.stream_id.to_vec();
        created.sort_unstable();
        assert_eq!(created, ["Invoice-1", "Invoice-2"]);
        assert_eq!(plan.head, head(45, 9));
    }

    #[test]
    fn an_unmet_expectation_asks_for_the_stored_ids_then_conflicts() {
        let batch = [
            job("Invoice-1", ExpectedVersion::Exact(3), &[1]),
            job("Invoice-2", ExpectedVersion::Any, &[2]),
        ];
        let stored = HashMap::from([("Invoice-1".to_owned(), (1, 1))]);
        assert!(matches!(
            plan_batch(&batch, &[], &stored, None, None, head(1, 1)),
            Err(NeedStoredIds)
        ));
        let plan = plan_batch(
            &batch,
            &[],
            &stored,
            Some(&HashMap::new()),
            None,
            head(1, 1),
        )
        .unwrap();
        assert!(matches!(
            &plan.outcomes[0],
            Err(StoreError::Conflict { actual: 1, .. })
        ));
        // The conflict writes nothing; the other append takes the next position.
        assert_eq!(written(&plan.outcomes[1]).first_position, 2);
        assert_eq!(plan.events.position, [2]);
    }

    #[test]
    fn a_retry_inside_the_batch_gets_the_first_result_and_writes_once() {
        let batch = [
            job("Invoice-1", ExpectedVersion::NoStream, &[1, 2]),
            job("Invoice-1", ExpectedVersion::NoStream, &[1, 2]),
        ];
        let none = HashMap::new();
        assert!(matches!(
            plan_batch(&batch, &[], &none, None, None, head(0, 0)),
            Err(NeedStoredIds)
        ));
        let plan = plan_batch(&batch, &[], &none, Some(&HashMap::new()), None, head(0, 0)).unwrap();
        assert_eq!(written(&plan.outcomes[0]), written(&plan.outcomes[1]));
        assert_eq!(plan.events.position, [1, 2]);
    }

    #[test]
    fn skipped_appends_write_nothing() {
        let batch = [
            job("Invoice-1", ExpectedVersion::Any, &[1]),
            job("Invoice-2", ExpectedVersion::Any, &[2]),
        ];
        let plan = plan_batch(
            &batch,
            &[true, false],
            &HashMap::new(),
            None,
            None,
            head(0, 0),
        )
        .unwrap();
        assert!(plan.outcomes[0].is_err());
        assert_eq!(written(&plan.outcomes[1]).first_position, 1);
        assert_eq!(plan.new_streams.stream_id, ["Invoice-2"]);
    }

    #[test]
    fn a_command_key_runs_once_per_batch() {
        let keyed = |ids: &[u128]| {
            let mut j = job("Invoice-1", ExpectedVersion::Any, ids);
            j.command = Some(CommandKey::new("pay-1", "fingerprint"));
            j
        };
        let batch = [keyed(&[1]), keyed(&[2])];
        assert!(matches!(
            plan_batch(&batch, &[], &HashMap::new(), None, None, head(0, 0)),
            Err(NeedStoredIds)
        ));
        let commands = Commands {
            stored: HashMap::new(),
            now: Utc::now(),
            retention: Duration::from_secs(3600),
        };
        let plan = plan_batch(
            &batch,
            &[],
            &HashMap::new(),
            None,
            Some(&commands),
            head(0, 0),
        )
        .unwrap();
        assert_eq!(written(&plan.outcomes[0]).last_position, 1);
        assert!(
            matches!(&plan.outcomes[1], Ok(Appended::Replayed(record)) if record.key == "pay-1")
        );
        assert_eq!(plan.commands.len(), 1);
        assert_eq!(plan.events.position, [1]);
    }

    proptest! {
        /// Whatever the batch, the plan hands out positions and versions
        /// without holes: positions follow the head, each stream's versions
        /// follow its stored version, and new streams are numbered after
        /// the last one.
        #[test]
        fn plans_leave_no_holes(
            appends in prop::collection::vec((0usize..5, 1usize..4), 1..40),
            stored_versions in prop::collection::vec(prop::option::of(0u64..50), 5),
            last_position in 0u64..1_000,
        ) {
            let streams: Vec<String> = (0..5).map(|s| format!("S-{s}")).collect();
            let stored: HashMap<String, (i64, u64)> = stored_versions
                .iter()
                .enumerate()
                .filter_map(|(s, v)| v.map(|v| (streams[s].clone(), (s as i64 + 1, v))))
                .collect();
            let mut next_id = 0u128;
            let batch: Vec<AppendJob> = appends
                .iter()
                .map(|&(s, n)| {
                    let ids: Vec<u128> = (0..n).map(|_| { next_id += 1; next_id }).collect();
                    job(&streams[s], ExpectedVersion::Any, &ids)
                })
                .collect();
            let plan = plan_batch(&batch, &[], &stored, None, None, head(last_position, 5)).unwrap();
            let total: usize = appends.iter().map(|&(_, n)| n).sum();
            let expected: Vec<i64> = (1..=total as i64).map(|p| p + last_position as i64).collect();
            prop_assert_eq!(&plan.events.position, &expected);
            prop_assert_eq!(plan.head.last_position, last_position + total as u64);
            let mut versions: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
            for (stream_no, version) in plan.events.stream_no.iter().zip(&plan.events.version) {
                versions.entry(*stream_no).or_default().push(*version);
            }
            for (stream_no, versions) in versions {
                let base = stored.values().find(|(no, _)| *no == stream_no).map_or(0, |(_, v)| *v as i64);
                let wanted: Vec<i64> = (1..=versions.len() as i64).map(|v| v + base).collect();
                prop_assert_eq!(versions, wanted);
            }
            let mut created = plan.new_streams.stream_no.clone();
            created.sort_unstable();
            let wanted: Vec<i64> = (6..6 + created.len() as i64).collect();
            prop_assert_eq!(created, wanted);
        }
    }
}
