//! Files the tests of several crates use.

/// A definitions file of declared read models for invoices, a domain
/// factline has no code for: tables with a key, defaults and a nullable
/// column, a lookup, insert, upsert with add/min/max, update, delete with
/// a condition, raw SQL, and a named query.
pub const INVOICES_READ_MODELS: &str = include_str!("../fixtures/invoices.toml");
