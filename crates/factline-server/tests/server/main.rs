//! The integration tests of `factline-server`, one test binary with a module
//! per concept (each module says what it checks).

#[macro_use]
mod common;

mod access;
mod api;
mod limits;
mod ready;
