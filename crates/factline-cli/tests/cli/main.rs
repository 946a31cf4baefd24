//! The `factline` binary's tests, one test binary with a module per
//! concept: the CLI contract (output shapes and exit codes, on the real
//! binary, once with a SQLite file and once with a PostgreSQL URL as
//! `--db`), the server, the dashboard in a real browser, hostile input and
//! the API fuzzer.

#[macro_use]
mod common;

mod any_domain;
mod api_fuzz;
mod dashboard;
mod demo;
mod events;
mod hardening;
mod hostile_json;
mod outbox;
mod projections;
mod read_models;
mod serve;
