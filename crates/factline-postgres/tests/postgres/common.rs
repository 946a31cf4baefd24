//! Helpers shared by the PostgreSQL store's test files.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use factline_core::{EventData, StreamId};
use factline_postgres::{CommitGate, PostgresConfig, PostgresStore};
use serde_json::json;
use tokio::sync::{mpsc, Mutex};

pub fn sid(s: &str) -> StreamId {
    StreamId::new(s).expect("test stream ids are valid")
}

pub fn events(n: u64, tag: &str) -> Vec<EventData> {
    (0..n)
        .map(|i| EventData::new("Tested", json!({ "tag": tag, "i": i })))
        .collect()
}

pub async fn connect(url: &str) -> PostgresStore {
    PostgresStore::connect(url).await.expect("connect store")
}

/// Holds each transaction of a store just before COMMIT until the test
/// decides: `true` commits, `false` rolls back.
pub struct Gate {
    reached: Mutex<mpsc::UnboundedReceiver<()>>,
    decide: mpsc::UnboundedSender<bool>,
}

impl Gate {
    pub fn new() -> (Arc<Gate>, CommitGate) {
        let (reached_tx, reached) = mpsc::unbounded_channel();
        let (decide, decisions) = mpsc::unbounded_channel::<bool>();
        let decisions = Arc::new(Mutex::new(decisions));
        let hook: CommitGate = Arc::new(move || {
            let (reached_tx, decisions) = (reached_tx.clone(), decisions.clone());
            Box::pin(async move {
                let _ = reached_tx.send(());
                decisions.lock().await.recv().await.unwrap_or(false)
            })
        });
        (
            Arc::new(Gate {
                reached: Mutex::new(reached),
                decide,
            }),
            hook,
        )
    }

    /// Waits until a transaction is held at the gate.
    pub async fn reached(&self) {
        tokio::time::timeout(Duration::from_secs(30), self.reached.lock().await.recv())
            .await
            .expect("a transaction reaches the commit gate")
            .expect("gate open");
    }

    pub fn release(&self, commit: bool) {
        self.decide.send(commit).expect("gate open");
    }
}

pub async fn gated_store(url: &str) -> (PostgresStore, Arc<Gate>) {
    let (gate, hook) = Gate::new();
    let mut config = PostgresConfig::new(url);
    config.commit_gate = Some(hook);
    let store = PostgresStore::connect_with(config)
        .await
        .expect("connect gated store");
    (store, gate)
}

/// Polls `check` until it holds, failing after 30 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
