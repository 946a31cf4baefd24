//! The in-memory store against the shared conformance suite.

factline_conformance::conformance_suite!(|limits| async move {
    (factline_core::InMemoryStore::with_limits(limits), ())
});
