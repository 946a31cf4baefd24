//! Projections with their checkpoint in the read model's transaction, on
//! SQLite and PostgreSQL, with the read model in the events' own database
//! and in another one: batches, a refused event rolling its batch back,
//! resuming without applying anything twice, and following live appends.

use factline_core::{EventData, ExpectedVersion, StreamId};
use factline_projections::{
    BatchPolicy, Freshness, OnTimeout, Parking, PoisonPolicy, ProjectionError, RetryPolicy, Runner,
    Sink, SqliteSink,
};
use serde_json::json;
use std::time::Duration;

use crate::targets::*;

on_every_target!(
    catches_up_in_batches_with_the_checkpoint,
    a_poison_event_stops_the_projection_and_resuming_applies_each_event_once,
    poison_events_are_parked_with_their_stream_held_back,
    skipped_events_release_their_stream_on_retry,
    follows_live_appends_until_stopped,
    pause_holds_batches_back_until_resumed,
    a_second_runner_cannot_apply_events_the_first_applied,
    lag_counts_events_and_seconds_behind,
    reads_wait_for_the_position_of_a_write,
);

async fn catches_up_in_batches_with_the_checkpoint<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 1234).await;
    let mut runner = Runner::new(target.store(), target.sink(None).await);
    let stats = runner.catch_up(u64::MAX).await.unwrap();
    assert_eq!((stats.events, stats.checkpoint), (1234, 1234));
    assert_eq!(stats.largest_batch, 500, "batches hold at most 500 events");
    assert!(stats.batches >= 3, "{stats:?}");
    let (counts, checkpoint) = T::read_model(&mut runner.into_sink()).await;
    assert_eq!((counts, checkpoint), (expected_counts(1234), 1234));
}

/// Quick retries for tests.
fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        first_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
    }
}

/// P8 with the stop policy: the failing event is retried, then the run
/// stops and says why; what came before it is committed with the
/// checkpoint, and a restart applies every event once.
async fn a_poison_event_stops_the_projection_and_resuming_applies_each_event_once<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 1234).await;
    let mut runner =
        Runner::new(target.store(), target.sink(Some(700)).await).with_retries(quick_retries());
    match runner.catch_up(u64::MAX).await {
        Err(ProjectionError::Apply {
            position, message, ..
        }) => {
            assert_eq!(position, 700);
            assert!(message.contains("after 3 attempts"), "{message}");
        }
        other => panic!("expected the refusal at 700, got {other:?}"),
    }
    let mut sink = runner.into_sink();
    let (counts, checkpoint) = T::read_model(&mut sink).await;
    assert_eq!(checkpoint, 699, "everything before the poison event is in");
    assert_eq!(
        counts,
        expected_counts(699),
        "read model and checkpoint move together"
    );

    // A new run (as after a restart) resumes from the checkpoint.
    let mut runner = Runner::new(target.store(), target.sink(None).await);
    let stats = runner.catch_up(u64::MAX).await.unwrap();
    assert_eq!(stats.events, 535);
    let (counts, checkpoint) = T::read_model(&mut runner.into_sink()).await;
    assert_eq!((counts, checkpoint), (expected_counts(1234), 1234));
}

/// P8 with the park policy: the poison event is parked with its error, and
/// every later event of its stream is parked behind it; the rest goes on.
/// Parked events are listed, retried (in stream order) and skipped.
async fn poison_events_are_parked_with_their_stream_held_back<T: Target>() {
    let target = T::start().await;
    // Position 150 is in stream Order-1, which also holds 101..200 and
    // 801..900 (see `append`).
    append(&target.store(), 1000).await;
    let parking = |runner: Runner<T::Sink>| {
        runner
            .with_retries(quick_retries())
            .with_poison_policy(PoisonPolicy::Park)
    };
    let mut runner = parking(Runner::new(target.store(), target.sink(Some(150)).await));
    let status = runner.status();
    runner.catch_up(u64::MAX).await.unwrap();
    let lag = status.lag(1000);
    assert_eq!((lag.checkpoint, lag.parked, lag.skipped), (1000, 151, 0));
    let mut sink = runner.into_sink();
    let parked = sink.parked().await.unwrap();
    let positions: Vec<u64> = parked.iter().map(|p| p.position).collect();
    let held: Vec<u64> = (150..=200).chain(801..=900).collect();
    assert_eq!(positions, held);
    assert_eq!(
        (parked[0].attempts, parked[0].error.as_str()),
        (3, "refused on purpose")
    );
    assert!(parked[1..]
        .iter()
        .all(|p| p.attempts == 0 && p.error.contains("held back")));
    assert!(parked.iter().all(|p| p.stream_id == "Order-1"));
    let (counts, _) = T::read_model(&mut sink).await;
    let mut expected = expected_counts(1000);
    for position in &held {
        let event_type = TYPES[((position - 1) % 3) as usize];
        *expected.get_mut(event_type).unwrap() -= 1;
    }
    assert_eq!(counts, expected, "everything else was applied");

    // Retrying while the event still fails changes nothing.
    let report = sink.retry(target.store().as_ref()).await.unwrap();
    assert_eq!((report.applied, report.still_parked), (0, 151));
    assert_eq!(sink.parked().await.unwrap()[0].attempts, 4);

    // Fixed: a retry applies them all, in order.
    let mut fixed = target.sink(None).await;
    let report = fixed.retry(target.store().as_ref()).await.unwrap();
    assert_eq!((report.applied, report.still_parked), (151, 0));
    assert!(fixed.parked().await.unwrap().is_empty());
    assert_eq!(
        T::read_model(&mut fixed).await,
        (expected_counts(1000), 1000)
    );
}

/// Skipping a parked event lets the events held behind it through on the
/// next retry; the skip is counted.
async fn skipped_events_release_their_stream_on_retry<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 300).await;
    let mut runner = Runner::new(target.store(), target.sink(Some(150)).await)
        .with_retries(quick_retries())
        .with_poison_policy(PoisonPolicy::Park);
    runner.catch_up(u64::MAX).await.unwrap();
    let mut sink = runner.into_sink();
    assert_eq!(sink.parked().await.unwrap().len(), 51);
    assert!(sink.skip(150).await.unwrap());
    assert!(!sink.skip(150).await.unwrap(), "skipped already");
    let report = sink.retry(target.store().as_ref()).await.unwrap();
    assert_eq!((report.applied, report.still_parked), (50, 0));
    assert_eq!(sink.parked_counts().await.unwrap(), (0, 1));
    let (counts, _) = T::read_model(&mut sink).await;
    let mut expected = expected_counts(300);
    *expected.get_mut(TYPES[(149 % 3) as usize]).unwrap() -= 1;
    assert_eq!(counts, expected, "all but the skipped event");
    // A restarted runner reports the skip in its lag.
    let mut runner = Runner::new(target.store(), sink);
    let status = runner.status();
    runner.catch_up(u64::MAX).await.unwrap();
    assert_eq!((status.lag(300).parked, status.lag(300).skipped), (0, 1));
}

async fn follows_live_appends_until_stopped<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 10).await;
    let mut runner =
        Runner::new(target.store(), target.sink(None).await).with_policy(BatchPolicy {
            max_events: 500,
            max_wait: Duration::from_millis(20),
        });
    let mut progress = runner.watch_checkpoint();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move {
        let stats = runner.run(stopped).await;
        (stats, runner)
    });
    append(&target.store(), 300).await;
    let head = target.store().head_position().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), progress.wait_for(|p| *p == head))
        .await
        .expect("the projection reaches the head")
        .unwrap();
    stop.send_replace(true);
    let (stats, runner) = running.await.unwrap();
    assert_eq!(stats.unwrap().checkpoint, head);
    let (counts, checkpoint) = T::read_model(&mut runner.into_sink()).await;
    let mut expected = expected_counts(10);
    for (t, n) in expected_counts(300) {
        *expected.entry(t).or_default() += n;
    }
    assert_eq!((counts, checkpoint), (expected, 310));
}

/// An operator's pause holds every batch back (also one already waiting
/// to commit) until resumed; a paused runner still stops when told, and
/// the admin view shows the projection's state.
async fn pause_holds_batches_back_until_resumed<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 10).await;
    let mut runner =
        Runner::new(target.store(), target.sink(None).await).with_policy(BatchPolicy {
            max_events: 500,
            max_wait: Duration::from_millis(20),
        });
    let status = runner.status();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { runner.run(stopped).await });
    status.wait_for(10, Duration::from_secs(30)).await.unwrap();
    let listed = target.projections().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].name.as_str(), listed[0].active_version),
        ("counts", Some(1))
    );
    assert_eq!((listed[0].checkpoint, listed[0].paused), (10, false));

    target.set_paused("counts", true).await;
    append(&target.store(), 30).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(status.checkpoint(), 10, "nothing commits while paused");
    assert!(status.is_paused());
    let listed = target.projections().await;
    assert_eq!((listed[0].checkpoint, listed[0].paused), (10, true));

    target.set_paused("counts", false).await;
    status.wait_for(40, Duration::from_secs(30)).await.unwrap();
    assert!(!status.is_paused());

    // Stopping a paused runner ends it without committing.
    target.set_paused("counts", true).await;
    append(&target.store(), 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send_replace(true);
    let stats = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("a paused runner stops when told")
        .unwrap()
        .unwrap();
    assert_eq!(stats.checkpoint, 40);
    let (counts, checkpoint) = T::read_model(&mut target.sink(None).await).await;
    let mut expected = expected_counts(10);
    for (t, n) in expected_counts(30) {
        *expected.entry(t).or_default() += n;
    }
    assert_eq!((counts, checkpoint), (expected, 40));
}

/// Two runners of one projection (say, in two processes without a lease):
/// the one that read the checkpoint before the other moved it cannot
/// apply those events again; its batch is rolled back as contended.
async fn a_second_runner_cannot_apply_events_the_first_applied<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 300).await;
    let mut late = Runner::new(target.store(), target.sink(None).await).with_policy(BatchPolicy {
        max_events: 50,
        max_wait: Duration::from_millis(100),
    });
    let mut early = Runner::new(target.store(), target.sink(None).await);
    // Both start from 0: `late` reads its checkpoint first...
    assert_eq!(late.sink_mut().checkpoint().await.unwrap(), 0);
    early.catch_up(u64::MAX).await.unwrap();
    // ...and then finds it moved.
    match late
        .sink_mut()
        .apply_batch(target.store().read_all(1, 50).await.unwrap().into())
        .await
    {
        Err(ProjectionError::Contended {
            expected, found, ..
        }) => {
            assert_eq!((expected, found), (0, 300))
        }
        other => panic!("a second runner applied events again: {other:?}"),
    }
    // Started afresh it reads the moved checkpoint and has nothing to do.
    let stats = late.catch_up(u64::MAX).await.unwrap();
    assert_eq!((stats.events, stats.checkpoint), (0, 300));
    let (counts, checkpoint) = T::read_model(&mut early.into_sink()).await;
    assert_eq!((counts, checkpoint), (expected_counts(300), 300));
}

/// Lag in events and seconds (P9): behind before a run, part-way after a
/// partial catch-up, nothing once caught up.
async fn lag_counts_events_and_seconds_behind<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 1000).await;
    let mut runner = Runner::new(target.store(), target.sink(None).await);
    let status = runner.status();
    assert_eq!(status.lag(1000).events_behind, 1000);
    // Let the events age a little, so the lag in seconds is above zero.
    tokio::time::sleep(Duration::from_millis(20)).await;
    runner.catch_up(500).await.unwrap();
    let lag = status.lag(1000);
    assert_eq!((lag.checkpoint, lag.events_behind), (500, 500));
    assert!(lag.seconds_behind > 0.0, "{lag:?}");
    assert_eq!((lag.skipped, lag.parked), (0, 0));

    // A new runner (a restart) knows the last applied event's time too.
    let mut restarted = Runner::new(target.store(), target.sink(None).await);
    let status = restarted.status();
    restarted.catch_up(600).await.unwrap();
    assert!(status.lag(1000).seconds_behind > 0.0);
    restarted.catch_up(u64::MAX).await.unwrap();
    let lag = status.lag(1000);
    assert_eq!((lag.events_behind, lag.seconds_behind), (0, 0.0));
}

/// Read-your-writes (P11): a read waits for the position its write
/// returned; past the timeout it fails, or answers flagged as stale.
async fn reads_wait_for_the_position_of_a_write<T: Target>() {
    let target = T::start().await;
    let store = target.store();
    let mut runner = Runner::new(store.clone(), target.sink(None).await).with_policy(BatchPolicy {
        max_events: 500,
        max_wait: Duration::from_millis(10),
    });
    let status = runner.status();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move { runner.run(stopped).await });
    let order = StreamId::new("Order-ryw").unwrap();
    let one = || vec![EventData::new("Placed", json!({}))];
    let written = store
        .append(&order, ExpectedVersion::Any, one())
        .await
        .unwrap();
    let answer = status
        .read_at(written.last_position, Freshness::default(), || async {
            "read"
        })
        .await
        .unwrap();
    assert!(!answer.stale);
    assert!(status.checkpoint() >= written.last_position);
    stop.send_replace(true);
    running.await.unwrap().unwrap();

    // Nobody projects any more: the next write is never reached.
    let unseen = store
        .append(&order, ExpectedVersion::Any, one())
        .await
        .unwrap();
    let short = Freshness {
        timeout: Duration::from_millis(100),
        on_timeout: OnTimeout::Fail,
    };
    let not_yet = status
        .read_at(unseen.last_position, short, || async { "read" })
        .await
        .unwrap_err();
    assert_eq!(
        (not_yet.wanted, not_yet.reached),
        (unseen.last_position, written.last_position)
    );
    let stale = Freshness {
        on_timeout: OnTimeout::AnswerStale,
        ..short
    };
    let answer = status
        .read_at(unseen.last_position, stale, || async { "read" })
        .await
        .unwrap();
    assert_eq!((answer.value, answer.stale), ("read", true));
    assert_eq!(Freshness::default().timeout, Duration::from_secs(5));
}

#[test]
fn read_model_failures_keep_their_source_and_refusals_are_told_apart() {
    use std::error::Error as _;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let Err(failed) = SqliteSink::open(file.join("read.db"), version(1)) else {
        panic!("a read model under a plain file cannot be created");
    };
    assert!(
        matches!(&failed, ProjectionError::ReadModel { projection, .. } if projection == "counts"),
        "{failed:?}"
    );
    assert!(!failed.is_retryable());
    let source = failed.source().expect("the storage error");
    assert!(
        source.source().is_some(),
        "and the system's error under it: {failed:?}"
    );

    let invalid = factline_projections::Partition::new(3, 2);
    assert!(
        matches!(invalid, Err(ProjectionError::Invalid { .. })),
        "{invalid:?}"
    );
    assert!(!invalid.unwrap_err().is_retryable());
}

/// A read-model database another connection keeps locked for longer than
/// the busy timeout fails a batch with a failure that may pass: the live
/// runner writes the same batch again after a backoff instead of
/// stopping, and ends with every event applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_runner_outlasts_a_read_model_locked_past_the_busy_timeout() {
    let target = Sqlite::<false>::start().await;
    append(&target.store(), 10).await;
    let sink = target.sink(None).await;
    let (locked, held) = std::sync::mpsc::channel();
    let path = target.read_path();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        // Past the sink's 10 s busy timeout, so one attempt fails.
        std::thread::sleep(Duration::from_secs(12));
        conn.execute_batch("COMMIT").unwrap();
    });
    held.recv().unwrap();
    let mut runner = Runner::new(target.store(), sink).with_retries(RetryPolicy {
        attempts: 4,
        first_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    });
    let mut progress = runner.watch_checkpoint();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move {
        let stats = runner.run(stopped).await;
        (stats, runner)
    });
    let head = target.store().head_position().await.unwrap();
    let reached = tokio::time::timeout(Duration::from_secs(60), progress.wait_for(|p| *p == head));
    let reached = reached.await;
    holder.join().unwrap();
    stop.send_replace(true);
    let (stats, runner) = running.await.unwrap();
    let stats = stats.expect("the runner did not stop on a locked database");
    assert!(
        reached.is_ok(),
        "the projection reaches the head once the lock is gone"
    );
    assert_eq!(stats.checkpoint, head);
    let (counts, checkpoint) = Sqlite::<false>::read_model(&mut runner.into_sink()).await;
    assert_eq!((counts, checkpoint), (expected_counts(10), 10));
}
