//! Versions of a read model: diffs, blue/green rebuilds beside the active
//! version, resuming or discarding a stopped rebuild, rate-limited rebuilds.

use factline_projections::{ProjectionError, Runner, VersionedSink};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::targets::*;

on_every_target!(
    rebuild_builds_beside_the_active_version_and_swaps,
    stopped_rebuild_resumes_or_is_discarded_and_swaps_may_keep_the_old_version,
    rebuilds_can_be_rate_limited_and_report_progress,
    diff_reports_what_a_swap_would_change,
);

fn doubled(counts: BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    counts.into_iter().map(|(t, n)| (t, n * 2)).collect()
}

/// P4: before a swap, the rebuilt version can be compared with the active
/// one: rows added, removed and changed, with samples.
async fn diff_reports_what_a_swap_would_change<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 999).await;
    let v1 = Counts {
        skip: Some("Paid"),
        ..version(1)
    };
    let mut active = Runner::new(target.store(), target.open(v1, false).await);
    active.catch_up(u64::MAX).await.unwrap();
    let v2 = Counts {
        skip: Some("Shipped"),
        ..version(2)
    };
    let mut rebuild = Runner::new(target.store(), target.open(v2, true).await);
    rebuild.catch_up(u64::MAX).await.unwrap();
    let report = rebuild.sink_mut().diff(5).await.unwrap();
    assert_eq!((report.active, report.candidate), (Some(1), 2));
    assert!(!report.is_empty());
    let [table] = &report.tables[..] else {
        panic!("one table: {report:?}")
    };
    assert_eq!(table.table, "counts");
    assert_eq!((table.added, table.removed, table.changed), (1, 1, 1));
    assert_eq!(
        table.added_samples,
        vec![json!({"event_type": "Paid", "n": 666})]
    );
    assert_eq!(
        table.removed_samples,
        vec![json!({"event_type": "Shipped", "n": 333})]
    );
    assert_eq!(
        table.changed_samples,
        vec![(
            json!({"event_type": "Placed", "n": 333}),
            json!({"event_type": "Placed", "n": 666})
        )]
    );
    // Reviewing changes nothing: version 1 still serves.
    let (counts, _) = T::read_model(active.sink_mut()).await;
    assert_eq!(counts.get("Shipped"), Some(&333));
    // The same projection again differs in nothing.
    let same = Counts {
        skip: Some("Paid"),
        weight: 1,
        ..version(3)
    };
    let mut again = Runner::new(target.store(), target.open(same, true).await);
    again.catch_up(u64::MAX).await.unwrap();
    assert!(again.sink_mut().diff(5).await.unwrap().is_empty());
}

/// Blue/green (P4, P5): version 2 is built beside version 1, which keeps
/// serving reads (and following appends) until the swap; the swap re-points
/// the views at once and drops version 1, whose runner then stops.
async fn rebuild_builds_beside_the_active_version_and_swaps<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 900).await;
    let mut v1 = Runner::new(target.store(), target.sink(None).await);
    v1.catch_up(u64::MAX).await.unwrap();

    let mut v2 = Runner::new(target.store(), target.open(version(2), true).await);
    v2.catch_up(600).await.unwrap();
    // Version 1 still serves, and keeps following the log.
    append(&target.store(), 300).await;
    v1.catch_up(u64::MAX).await.unwrap();
    let mut v1_sink = v1.into_sink();
    assert_eq!(
        T::read_model(&mut v1_sink).await,
        (expected_counts(1200), 1200)
    );

    v2.catch_up(u64::MAX).await.unwrap();
    let previous = v2.sink_mut().swap(false).await.unwrap();
    assert_eq!(previous, Some(1));
    let mut v2_sink = v2.into_sink();
    let (counts, checkpoint) = T::read_model(&mut v2_sink).await;
    assert_eq!((counts, checkpoint), (doubled(expected_counts(1200)), 1200));
    assert!(T::has_table(&mut v2_sink, "counts_v2").await);
    assert!(
        !T::has_table(&mut v2_sink, "counts_v1").await,
        "version 1 is dropped"
    );

    // The old version's runner stops instead of writing.
    append(&target.store(), 30).await;
    let mut v1 = Runner::new(target.store(), v1_sink);
    match v1.catch_up(u64::MAX).await {
        Err(ProjectionError::NotActive {
            version: 1,
            active: 2,
            ..
        }) => {}
        other => panic!("expected version 1 to stop, got {other:?}"),
    }
    // Version 2 goes on live from its checkpoint.
    let mut v2 = Runner::new(target.store(), target.open(version(2), false).await);
    assert_eq!(v2.catch_up(u64::MAX).await.unwrap().events, 30);
    let (counts, _) = T::read_model(&mut v2.into_sink()).await;
    assert_eq!(counts, doubled(expected_counts(1230)));
}

/// P6: a rebuild stopped part-way leaves version 1 as it was; it resumes
/// from its own checkpoint, or is discarded. A swap can keep version 1.
async fn stopped_rebuild_resumes_or_is_discarded_and_swaps_may_keep_the_old_version<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 999).await;
    let mut v1 = Runner::new(target.store(), target.sink(None).await);
    v1.catch_up(u64::MAX).await.unwrap();
    // Stopped at 400 (a cancel or a crash).
    let mut rebuild = Runner::new(target.store(), target.open(version(2), true).await);
    rebuild.catch_up(400).await.unwrap();
    drop(rebuild);
    let mut v1_sink = v1.into_sink();
    assert_eq!(
        T::read_model(&mut v1_sink).await,
        (expected_counts(999), 999)
    );

    let mut resumed = Runner::new(target.store(), target.open(version(2), true).await);
    let stats = resumed.catch_up(u64::MAX).await.unwrap();
    assert_eq!(stats.events, 599, "it resumed at its own checkpoint");
    resumed.sink_mut().discard().await.unwrap();
    let mut discarded = resumed.into_sink();
    assert!(!T::has_table(&mut discarded, "counts_v2").await);
    assert_eq!(
        T::read_model(&mut v1_sink).await,
        (expected_counts(999), 999)
    );

    // Built again from scratch, swapped in keeping version 1.
    let mut again = Runner::new(target.store(), target.open(version(2), true).await);
    assert_eq!(again.catch_up(u64::MAX).await.unwrap().events, 999);
    assert_eq!(again.sink_mut().swap(true).await.unwrap(), Some(1));
    let mut v2_sink = again.into_sink();
    assert!(
        T::has_table(&mut v2_sink, "counts_v1").await,
        "kept on request"
    );
    let (counts, _) = T::read_model(&mut v2_sink).await;
    assert_eq!(counts, doubled(expected_counts(999)));
    // The active version cannot be discarded.
    assert!(v2_sink.discard().await.is_err());
}

/// P5: a rate-limited rebuild applies at most the rate on average, in
/// batches of a tenth of a second's worth, and reports its progress.
async fn rebuilds_can_be_rate_limited_and_report_progress<T: Target>() {
    let target = T::start().await;
    append(&target.store(), 900).await;
    let mut rebuild =
        Runner::new(target.store(), target.open(version(1), false).await).with_rate_limit(3000);
    let status = rebuild.status();
    assert_eq!(status.progress(), None, "no catch-up yet");
    let started = std::time::Instant::now();
    let watcher = {
        let status = status.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen
                .last()
                .is_none_or(|p: &factline_projections::Progress| p.done < p.total)
            {
                if let Some(progress) = status.progress() {
                    seen.push(progress);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    let stats = rebuild.catch_up(u64::MAX).await.unwrap();
    // A lower bound only: a slow machine makes it longer, never shorter.
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "900 events at 3000/s took {:?}",
        started.elapsed()
    );
    assert!(stats.largest_batch <= 300, "{stats:?}");
    let seen = watcher.await.unwrap();
    assert!(seen.iter().all(|p| p.total == 900));
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));
    let last = seen.last().unwrap();
    assert_eq!(last.done, 900);
    assert!(seen
        .iter()
        .any(|p| p.done > 0 && p.done < 900 && p.eta.is_some()));
}
