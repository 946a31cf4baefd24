//! The in-memory store against the shared conformance suite.

factline_conformance::conformance_suite!(|| async { (factline_core::InMemoryStore::new(), ()) });
