//! `/ready` follows the store: a stopped PostgreSQL makes it 503 while
//! `/health` stays 200, and it recovers when the server is back.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestServer;
use factline_server::ServerConfig;
use factline_testkit::pg::{Durability, PgCluster, StopMode};

async fn until_status(server: &TestServer, path: &str, want: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = server.get(path).await;
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_a_stopped_and_restarted_postgres() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| PgCluster::start(Durability::Throwaway))
            .await
            .unwrap(),
    );
    let db = factline_testkit::pg::create_database(&cluster.url("postgres")).await;
    let store = factline_postgres::PostgresStore::connect(&db.url)
        .await
        .unwrap();
    let config = {
        let mut config = ServerConfig::default();
        config.request_timeout = Duration::from_secs(5);
        config
    };
    let server = TestServer::start(Arc::new(store), config).await;
    let ready = until_status(&server, "/ready", 200).await;
    assert_eq!(ready["status"], "ready");

    let stopping = cluster.clone();
    tokio::task::spawn_blocking(move || stopping.stop(StopMode::Fast))
        .await
        .unwrap();
    let down = until_status(&server, "/ready", 503).await;
    assert_eq!(down["status"], "unavailable", "{down}");
    assert!(
        down["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{down}"
    );
    assert_eq!(
        server.get("/health").await.0,
        200,
        "the process is still up"
    );
    // An append while the database is down fails as unavailable, with JSON.
    let (status, body) = server
        .post("/streams/Order-1", r#"{"type":"A"}"#, &[])
        .await;
    assert!(
        status == 503 || status == 500 || status == 408,
        "{status} {body}"
    );

    let restarting = cluster.clone();
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .unwrap();
    until_status(&server, "/ready", 200).await;
    let (status, body) = server
        .post("/streams/Order-1", r#"{"type":"A"}"#, &[])
        .await;
    assert_eq!(status, 201, "{body}");
    server.stop().await;
}
