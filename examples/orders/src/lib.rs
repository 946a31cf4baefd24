//! The orders domain (D1): the living example of factline's command side,
//! used by `factline demo`, the tests and the benchmarks.
//!
//! - [`Customer`]s are registered in a region and may move to another.
//! - [`Order`]s are placed with lines (sku, quantity, unit price), then paid,
//!   shipped or cancelled, under the rules in [`OrderError`].
//! - `OrderPlaced` has a v1 and a v2 shape; [`order`] registers the upcaster
//!   between them (C5).
//! - [`load`] drives a realistic mix of commands through the command
//!   handler.
//! - [`READ_MODELS`] declares the demo's read models (order list, revenue
//!   per region and day, customer totals) for the server to run;
//!   [`read_models`] has the same three in Rust, for embedders.

pub mod customer;
pub mod history;
pub mod load;
pub mod order;
pub mod read_models;

pub use customer::{Customer, CustomerCommand, CustomerError, CustomerEvent};
pub use order::{Order, OrderCommand, OrderError, OrderEvent, OrderLine, OrderStatus};

/// The demo's read models as a definitions file (`read_models.toml`; see
/// `docs/read-models.md`).
pub const READ_MODELS: &str = include_str!("../read_models.toml");
