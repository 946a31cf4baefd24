//! The SQLite store against the shared conformance suite, each test on its
//! own database file.

factline_conformance::conformance_suite!(|limits| async move {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = factline_sqlite::SqliteConfig::new(dir.path().join("events.db"));
    config.limits = limits;
    let store = factline_sqlite::SqliteStore::open_with(config).expect("open store");
    (store, dir)
});
