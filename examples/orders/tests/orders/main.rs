//! The integration tests of `orders`, one test binary with a module
//! per concept (each module says what it checks).

#[macro_use]
mod common;

mod crash;
mod leases;
mod read_models;
mod rules;
mod stores;
