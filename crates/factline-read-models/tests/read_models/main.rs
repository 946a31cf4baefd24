//! Declared read models: checking definitions files, and running them on
//! SQLite and PostgreSQL against a fold of the same events.

mod caching;
mod checking;
mod reading;
mod running;
