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

pub mod customer;
pub mod history;
pub mod load;
pub mod order;
pub mod read_models;

pub use customer::{Customer, CustomerCommand, CustomerError, CustomerEvent};
pub use order::{Order, OrderCommand, OrderError, OrderEvent, OrderLine, OrderStatus};
