//! The integration tests of `factline-sqlite`, one test binary with a module
//! per concept (each module says what it checks).

mod conformance;
mod crash;
mod sqlite;
