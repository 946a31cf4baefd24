//! The conformance suite: the store behaviour every factline backend must
//! show. A backend's test file calls [`conformance_suite!`] with a factory
//! that returns a fresh, empty store with the given [`Limits`] (and a guard
//! that keeps whatever backs it, such as a temporary directory, alive for
//! the test).
//!
//! ```text
//! factline_conformance::conformance_suite!(|limits| async move {
//!     (InMemoryStore::with_limits(limits), ())
//! });
//! ```
//!
//! [`Limits`]: factline_core::Limits
//!
//! The calling crate needs `tokio` (with `macros` and `rt-multi-thread`) as a
//! dev-dependency.

#![warn(missing_docs)]

// Each case is named for the behaviour it checks: the name is its
// documentation.
#[allow(missing_docs)]
pub mod cases;

pub use factline_core::Limits;

/// Expands to one `#[tokio::test]` per conformance case.
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::conformance_suite!(@cases $factory;
            no_stream_creates_stream_with_versions_from_one,
            no_stream_on_existing_stream_conflicts,
            exact_version_matches_or_conflicts_with_actual,
            exact_zero_means_no_stream,
            stream_exists_requires_events,
            any_always_appends,
            concurrent_appends_at_same_version_exactly_one_wins,
            conflict_in_one_append_does_not_fail_concurrent_others,
            idempotent_retry_returns_original_and_writes_nothing,
            idempotent_retry_with_incompatible_expectation_conflicts,
            idempotent_retry_with_changed_content_is_a_mismatch,
            partial_overlap_is_refused_and_writes_nothing,
            event_id_used_in_other_stream_is_refused,
            duplicate_event_id_in_one_append_is_refused,
            empty_append_is_refused,
            oversized_event_is_refused_and_nothing_written,
            malformed_event_type_is_refused_and_nothing_written,
            unreadable_json_is_refused_and_nothing_written,
            bounded_reads_stop_at_the_byte_budget,
            invalid_stream_ids_cannot_be_constructed,
            read_stream_forwards_backwards_from_and_limit,
            read_missing_stream_is_empty,
            read_all_positions_strictly_increase_with_from_and_limit,
            read_category_returns_only_that_category,
            tally_counts_events_by_category_and_type_in_bounded_steps,
            metadata_and_data_round_trip,
            any_valid_json_round_trips,
            simultaneous_identical_appends_write_once,
            large_append_refused_late_writes_nothing,
            subscription_catches_up_then_goes_live_under_concurrent_writes,
            subscription_to_category_and_stream_filters_and_resumes,
            command_key_is_stored_with_its_events_and_repeats_replay,
            command_key_of_another_command_is_refused,
            rejected_command_stores_no_key,
            concurrent_commands_with_one_key_execute_once,
            snapshots_keep_the_newest_per_stream_and_format,
        );
        $crate::conformance_suite!(@limited $factory;
            expired_command_keys_are_free_and_purged_on_demand
                => $crate::cases::short_command_retention(false),
            expired_command_keys_are_purged_by_the_store
                => $crate::cases::short_command_retention(true),
        );
    };
    (@limited $factory:expr; $($case:ident => $limits:expr),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (store, _guard) = ($factory)($limits).await;
                $crate::cases::$case(store).await;
            }
        )*
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (store, _guard) = ($factory)($crate::Limits::default()).await;
                $crate::cases::$case(store).await;
            }
        )*
    };
}

/// Runs each named `async fn(Arc<dyn EventStore>)` in the calling module as
/// a test on every backend: `memory::case`, `sqlite::case` (a fresh file)
/// and `postgres::case` (a fresh database). For tests of code built on the
/// store, such as the command side. The calling crate needs
/// `factline-core`, `factline-sqlite`, `factline-postgres`,
/// `factline-testkit`, `tempfile` and `tokio` as dev-dependencies.
#[macro_export]
macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(std::sync::Arc::new(factline_core::InMemoryStore::new())).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let dir = tempfile::tempdir().expect("temp dir");
                    let store = factline_sqlite::SqliteStore::open(dir.path().join("events.db"))
                        .expect("open the SQLite store");
                    super::$case(std::sync::Arc::new(store)).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let db = factline_testkit::pg::database().await;
                    let store = factline_postgres::PostgresStore::connect(&db.url)
                        .await
                        .expect("connect to the test database");
                    super::$case(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
}
