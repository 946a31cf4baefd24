//! What factline's tests and benchmarks share, in one place: throwaway
//! PostgreSQL clusters and per-test databases ([`pg`]), a local
//! `nats-server` with JetStream ([`nats`]), a test run again as a child
//! process and killed on purpose ([`process`]), and the runtime the tests
//! build ([`runtime`]), and fixtures ([`fixtures`]).
//!
//! Nothing here skips a test: when a service cannot be had, the test fails
//! with a message that says what to install.

#![warn(missing_docs)]

pub mod fixtures;
pub mod nats;
pub mod pg;
pub mod process;

/// A multi-threaded runtime of two workers with every driver enabled: the
/// shape of a small server, for tests that build their own.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
