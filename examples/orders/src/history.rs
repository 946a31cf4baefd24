//! Long synthetic histories of the orders domain, appended straight to a
//! store (no command handler, so a million events take seconds): for
//! benchmarks and for tests that need a big log fast.
//!
//! The history is deterministic: customers register (some later move to
//! another region), and orders are placed and, in a later append, mostly
//! paid and then shipped or cancelled with a refund; every thousandth order
//! is written in `OrderPlaced`'s v1 shape. Writers run concurrently and
//! each interleaves the lives of its orders, so a stream's events are
//! spread over the log as they are in production.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use factline_aggregate::DomainEvent;
use factline_core::{EventData, EventStore, ExpectedVersion, Metadata, StoreError, StreamId};

use crate::load::REGIONS;
use crate::order::legacy_order_placed;
use crate::{CustomerEvent, OrderEvent, OrderLine};

/// Why a history could not be written.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encoding a history event: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("a history writer stopped: {0}")]
    Writer(#[from] tokio::task::JoinError),
}

/// How many events an order's life has on average (placed, 90% paid and
/// then shipped or cancelled).
const EVENTS_PER_ORDER: f64 = 2.8;

/// How a history is shaped.
#[derive(Clone, Copy, Debug)]
pub struct HistoryConfig {
    /// Events to append, at least (the last orders finish their lives).
    pub events: u64,
    /// Concurrent writers; the store groups their commits.
    pub writers: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            events: 100_000,
            writers: 32,
        }
    }
}

/// The customer an order belongs to: one customer per 100 orders, at least
/// one per writer, so that each customer is owned by one writer (see
/// [`fill`]).
fn customers_for(orders: u64, writers: u64) -> u64 {
    (orders / 100).max(1).div_ceil(writers) * writers
}

fn customer_stream(c: u64) -> Result<StreamId, StoreError> {
    Ok(StreamId::new(format!("Customer-h{c}"))?)
}

fn region(n: u64) -> &'static str {
    REGIONS[(n % REGIONS.len() as u64) as usize]
}

/// The total of order `n`, a whole number of euros (so the v1 shape, in
/// euros, carries it exactly).
fn total_cents(n: u64) -> u64 {
    1_000 + (n % 97) * 100
}

/// The event that places order `n` of `customers` (v1 for every
/// thousandth order).
pub fn placed(n: u64, customers: u64) -> Result<EventData, HistoryError> {
    let customer = format!("h{}", n % customers);
    let total = total_cents(n);
    if n % 1000 == 999 {
        return Ok(legacy_order_placed(
            &customer,
            &[("SKU-HISTORY", 1, total as f64 / 100.0)],
        ));
    }
    encode(&OrderEvent::OrderPlaced {
        customer_id: customer,
        region: region(n / 7).into(),
        lines: vec![OrderLine::new("SKU-HISTORY", 1, total)],
        total_cents: total,
        currency: "EUR".into(),
    })
}

/// What happens to order `n` after it was placed: mostly paid, then
/// shipped, or cancelled with a refund; one in ten is left open.
fn rest_of_life(n: u64) -> Vec<OrderEvent> {
    if n % 10 == 0 {
        return Vec::new();
    }
    let total = total_cents(n);
    let paid = OrderEvent::OrderPaid {
        amount_cents: total,
        method: "card".into(),
    };
    let last = if n % 17 == 0 {
        OrderEvent::OrderCancelled {
            reason: "changed their mind".into(),
            refund_cents: total,
        }
    } else {
        OrderEvent::OrderShipped {
            carrier: "history-post".into(),
        }
    };
    vec![paid, last]
}

fn encode(event: &impl DomainEvent) -> Result<EventData, HistoryError> {
    Ok(event.to_event_data(Metadata::default())?)
}

/// Appends a history of at least `config.events` events and returns the
/// store's head. Customers come first; then each writer places its orders
/// and finishes each one a few orders later, and now and then moves one of
/// its own customers to another region.
pub async fn fill(store: Arc<dyn EventStore>, config: HistoryConfig) -> Result<u64, HistoryError> {
    let writers = config.writers.max(1);
    let orders = ((config.events as f64 / EVENTS_PER_ORDER).ceil() as u64).max(1);
    let customers = customers_for(orders, writers);
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let store = store.clone();
        tasks.spawn(async move {
            for c in (writer..customers).step_by(writers as usize) {
                let registered = encode(&CustomerEvent::CustomerRegistered {
                    name: format!("customer {c}"),
                    region: region(c).into(),
                })?;
                store
                    .append(
                        &customer_stream(c)?,
                        ExpectedVersion::NoStream,
                        vec![registered],
                    )
                    .await?;
            }
            Ok::<_, HistoryError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    for writer in 0..writers {
        let store = store.clone();
        tasks.spawn(async move {
            // Orders placed and not yet finished, oldest first.
            let mut open = VecDeque::new();
            // Where this writer's customers have moved to.
            let mut moved_to: HashMap<u64, &'static str> = HashMap::new();
            for n in (writer..orders).step_by(writers as usize) {
                let stream = StreamId::new(format!("Order-h{n}")).map_err(StoreError::from)?;
                store
                    .append(
                        &stream,
                        ExpectedVersion::NoStream,
                        vec![placed(n, customers)?],
                    )
                    .await?;
                open.push_back((n, stream));
                if open.len() > 3 {
                    finish(&store, open.pop_front()).await?;
                }
                // Customer n % customers belongs to this writer, since
                // customers is a multiple of writers.
                if n % 211 == writer {
                    let c = n % customers;
                    let from = moved_to.get(&c).copied().unwrap_or(region(c));
                    // The next region along.
                    let at = REGIONS.iter().position(|r| *r == from).unwrap_or(0);
                    let to = REGIONS[(at + 1) % REGIONS.len()];
                    moved_to.insert(c, to);
                    let moved = encode(&CustomerEvent::CustomerRelocated {
                        from: from.into(),
                        to: to.into(),
                    })?;
                    store
                        .append(&customer_stream(c)?, ExpectedVersion::Any, vec![moved])
                        .await?;
                }
            }
            while let Some(order) = open.pop_front() {
                finish(&store, Some(order)).await?;
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(store.head_position().await?)
}

async fn finish(
    store: &Arc<dyn EventStore>,
    order: Option<(u64, StreamId)>,
) -> Result<(), HistoryError> {
    let Some((n, stream)) = order else {
        return Ok(());
    };
    let events = rest_of_life(n)
        .iter()
        .map(encode)
        .collect::<Result<Vec<_>, _>>()?;
    if events.is_empty() {
        return Ok(());
    }
    store
        .append(&stream, ExpectedVersion::Exact(1), events)
        .await?;
    Ok(())
}
