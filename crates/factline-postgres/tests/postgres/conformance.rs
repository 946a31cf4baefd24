//! The PostgreSQL store against the shared conformance suite, each test on
//! its own database.

factline_conformance::conformance_suite!(|limits| async move {
    let db = factline_testkit::pg::database().await;
    let mut config = factline_postgres::PostgresConfig::new(&db.url);
    config.limits = limits;
    let store = factline_postgres::PostgresStore::connect_with(config)
        .await
        .expect("connect to the test database");
    (store, db)
});
