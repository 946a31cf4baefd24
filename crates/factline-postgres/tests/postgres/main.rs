//! The integration tests of `factline-postgres`, one test binary with a module
//! per concept (each module says what it checks).

#[macro_use]
mod common;

mod conformance;
mod failures;
mod migrations;
mod postgres;
mod stress;
