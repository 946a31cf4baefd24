//! The integration tests of `factline-projections`, one test binary with a module
//! per concept (each module says what it checks).

#[macro_use]
mod targets;

mod crash;
mod inline;
mod partitions;
mod projections;
mod reactors;
mod upsert;
mod versions;
