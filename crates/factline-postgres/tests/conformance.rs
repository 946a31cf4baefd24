//! The PostgreSQL store against the shared conformance suite, each test on
//! its own database.

factline_conformance::conformance_suite!(|| async {
    let db = factline_testpg::database().await;
    let store = factline_postgres::PostgresStore::connect(&db.url)
        .await
        .expect("connect to the test database");
    (store, db)
});
