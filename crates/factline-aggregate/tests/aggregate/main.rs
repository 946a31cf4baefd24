//! The command side's integration tests, one test binary with a module per
//! concept.

mod account;
mod handling;
mod loading;
mod rules;
