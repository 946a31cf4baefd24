//! The one migration mechanism on PostgreSQL: components migrate once
//! however many processes start at once, a schema newer than the build is
//! refused, and a store an earlier build made is adopted, not migrated
//! again.

use factline_postgres::{migrate, PostgresStore, SCHEMA_VERSION};

async fn recorded(client: &tokio_postgres::Client, component: &str) -> Vec<i32> {
    client
        .query(
            "SELECT version FROM factline.factline_migrations WHERE component = $1 ORDER BY version",
            &[&component],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn components_migrate_once_newer_ones_are_refused_and_earlier_stores_adopted() {
    let db = factline_testkit::pg::database().await;
    let thing = [
        "CREATE TABLE {s}.thing (x integer)",
        "ALTER TABLE {s}.thing ADD COLUMN y integer",
    ];
    // Stores and another component starting at once, each on its own
    // connection: every migration runs once (a second CREATE TABLE or ALTER
    // would fail).
    let starts: Vec<_> = (0..6)
        .map(|i| {
            let url = db.url.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    PostgresStore::connect(&url)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else {
                    let mut client = factline_testkit::pg::connect(&url).await;
                    migrate::apply(&mut client, "factline", "thing", &thing)
                        .await
                        .map_err(|e| e.to_string())
                }
            })
        })
        .collect();
    for start in starts {
        start.await.unwrap().unwrap();
    }
    let mut client = factline_testkit::pg::connect(&db.url).await;
    assert_eq!(
        recorded(&client, "store").await,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    assert_eq!(recorded(&client, "thing").await, [1, 2]);

    let refused = migrate::apply(&mut client, "factline", "thing", &thing[..1])
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("newer than this build's 1"),
        "{refused}"
    );

    // A store of an earlier build recorded its version in schema_version
    // only: it is adopted, and connecting again runs nothing twice.
    client
        .batch_execute("DELETE FROM factline.factline_migrations WHERE component = 'store'")
        .await
        .unwrap();
    PostgresStore::connect(&db.url).await.unwrap();
    assert_eq!(
        recorded(&client, "store").await,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
}
