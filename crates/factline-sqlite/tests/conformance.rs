//! The SQLite store against the shared conformance suite, each test on its
//! own database file.

factline_conformance::conformance_suite!(|| async {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        factline_sqlite::SqliteStore::open(dir.path().join("events.db")).expect("open store");
    (store, dir)
});
