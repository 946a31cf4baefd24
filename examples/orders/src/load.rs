//! A load generator: customers register, then orders go through a
//! realistic life (placed, mostly paid and shipped, some cancelled), with
//! the mistakes real clients make (shipping before paying, paying a
//! cancelled order, retrying a payment) — all through the command handler.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use factline_aggregate::{Aggregate, CommandContext, CommandError, CommandHandler, Failure};
use factline_core::EventStore;
use fastrand::Rng;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::{Customer, CustomerCommand, Order, OrderCommand, OrderLine, OrderStatus};

pub const REGIONS: [&str; 5] = ["eu-west", "eu-central", "us-east", "us-west", "apac"];

const NAMES: [&str; 8] = [
    "ada", "grace", "alan", "edsger", "barbara", "linus", "margaret", "ken",
];

const CATALOG: [(&str, u64); 6] = [
    ("SKU-KEYBOARD", 8_900),
    ("SKU-MONITOR", 24_900),
    ("SKU-CABLE", 1_200),
    ("SKU-DOCK", 15_500),
    ("SKU-MOUSE", 3_900),
    ("SKU-HEADSET", 12_900),
];

const CARRIERS: [&str; 3] = ["factline-post", "parcel-now", "bike-courier"];

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Customers registered before orders start.
    pub customers: usize,
    /// Orders placed in all.
    pub orders: usize,
    /// Orders started per second; `None` starts them as fast as the
    /// workers go.
    pub orders_per_second: Option<f64>,
    /// Orders in flight at once.
    pub concurrency: usize,
    /// Seeds every random choice: the same seed makes the same mix.
    pub seed: u64,
    /// Snapshot orders every this many events.
    pub snapshot_every: Option<u64>,
    /// No order starts once this turns true; those in flight finish.
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            customers: 20,
            orders: 100,
            orders_per_second: None,
            concurrency: 4,
            seed: 42,
            snapshot_every: None,
            stop: None,
        }
    }
}

/// What a run did, counted by the generator as the handler answered.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Prefix of every id this run made (`Customer-<run>-c1`, `Order-<run>-o1`).
    pub run_id: String,
    pub customers: usize,
    pub orders: usize,
    pub commands: u64,
    /// Accepted commands that wrote events.
    pub accepted: u64,
    /// Refused by a domain rule (on purpose: the mix makes mistakes).
    pub rejected: u64,
    /// Repeats answered from their idempotency key.
    pub replayed: u64,
    pub events: u64,
    /// Orders by final status.
    pub statuses: BTreeMap<String, u64>,
    /// Paid and not refunded, by region.
    pub revenue_cents: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn commands_per_second(&self) -> f64 {
        self.commands as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Why a run stopped: the store failed, or a command the generator meant
/// to succeed was refused (a bug in the mix or the domain).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Failed(#[from] Failure),
    #[error("{what} was refused: {reason}")]
    Unexpected { what: String, reason: String },
}

#[derive(Default)]
struct Counters {
    commands: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    replayed: AtomicU64,
    events: AtomicU64,
}

struct Run {
    customers: CommandHandler<Customer>,
    orders: CommandHandler<Order>,
    counters: Counters,
    /// (customer id, region) of every registered customer.
    registered: Vec<(String, String)>,
    run_id: String,
}

/// What one order's life ended as.
struct Finished {
    status: OrderStatus,
    region: String,
    revenue_cents: u64,
}

impl Run {
    /// Runs a command that should go through.
    async fn expect_ok<A: Aggregate>(
        &self,
        handler: &CommandHandler<A>,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
    ) -> Result<(), LoadError> {
        self.run_command(handler, id, command, context, false).await
    }

    /// Runs a command the rules must refuse (a client's mistake).
    async fn expect_rejected<A: Aggregate>(
        &self,
        handler: &CommandHandler<A>,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
    ) -> Result<(), LoadError> {
        self.run_command(handler, id, command, context, true).await
    }

    async fn run_command<A: Aggregate>(
        &self,
        handler: &CommandHandler<A>,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
        refusal_expected: bool,
    ) -> Result<(), LoadError> {
        let counters = &self.counters;
        counters.commands.fetch_add(1, Ordering::Relaxed);
        let unexpected = |reason: String| LoadError::Unexpected {
            what: format!("{}-{id}", A::CATEGORY),
            reason,
        };
        match handler.handle(id, command, context).await {
            Err(CommandError::Failed(failure)) => Err(failure.into()),
            Err(CommandError::Rejected(_)) if refusal_expected => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(other) => Err(unexpected(other.to_string())),
            Ok(_) if refusal_expected => {
                Err(unexpected("a command the rules forbid was accepted".into()))
            }
            Ok(outcome) if outcome.replayed => {
                counters.replayed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(outcome) => {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                let events = outcome.event_ids.len() as u64;
                counters.events.fetch_add(events, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// One order's whole life.
    async fn order_life(&self, n: usize, rng: &mut Rng) -> Result<Finished, LoadError> {
        let id = format!("{}-o{n}", self.run_id);
        // Everything about one order shares a correlation id.
        let ctx = || {
            CommandContext::new()
                .correlated_with(format!("{}-order-{n}", self.run_id))
                .by("load-generator")
        };
        let (customer_id, region) = &self.registered[rng.usize(..self.registered.len())];
        let lines: Vec<OrderLine> = (0..rng.usize(1..=4))
            .map(|_| {
                let (sku, price) = CATALOG[rng.usize(..CATALOG.len())];
                OrderLine::new(sku, rng.u32(1..=3), price)
            })
            .collect();
        let total: u64 = lines.iter().map(OrderLine::total_cents).sum();
        if rng.f64() < 0.02 {
            let mut bad = lines.clone();
            bad[0].quantity = 0;
            let place = OrderCommand::Place {
                customer_id: customer_id.clone(),
                region: region.clone(),
                lines: bad,
            };
            self.expect_rejected(&self.orders, &id, &place, &ctx())
                .await?;
        }
        let place = OrderCommand::Place {
            customer_id: customer_id.clone(),
            region: region.clone(),
            lines,
        };
        self.expect_ok(
            &self.orders,
            &id,
            &place,
            &ctx().idempotent(format!("place-{id}")),
        )
        .await?;
        let finished = |status, revenue_cents| Finished {
            status,
            region: region.clone(),
            revenue_cents,
        };
        let carrier = CARRIERS[rng.usize(..CARRIERS.len())].to_owned();
        if rng.f64() < 0.08 {
            let cancel = OrderCommand::Cancel {
                reason: "changed my mind".into(),
            };
            self.expect_ok(&self.orders, &id, &cancel, &ctx()).await?;
            if rng.bool() {
                let pay = OrderCommand::Pay {
                    amount_cents: total,
                    method: "card".into(),
                };
                self.expect_rejected(&self.orders, &id, &pay, &ctx())
                    .await?;
            }
            return Ok(finished(OrderStatus::Cancelled, 0));
        }
        if rng.f64() < 0.03 {
            let ship = OrderCommand::Ship {
                carrier: carrier.clone(),
            };
            self.expect_rejected(&self.orders, &id, &ship, &ctx())
                .await?;
        }
        let pay = OrderCommand::Pay {
            amount_cents: total,
            method: if rng.bool() { "card" } else { "invoice" }.into(),
        };
        let pay_key = format!("pay-{id}");
        self.expect_ok(&self.orders, &id, &pay, &ctx().idempotent(pay_key.clone()))
            .await?;
        if rng.f64() < 0.05 {
            // The client did not hear back and sends the payment again.
            self.expect_ok(&self.orders, &id, &pay, &ctx().idempotent(pay_key))
                .await?;
        }
        let fate = rng.f64();
        if fate < 0.05 {
            let cancel = OrderCommand::Cancel {
                reason: "out of stock".into(),
            };
            self.expect_ok(&self.orders, &id, &cancel, &ctx()).await?;
            return Ok(finished(OrderStatus::Cancelled, 0));
        }
        if fate < 0.90 {
            let ship = OrderCommand::Ship { carrier };
            self.expect_ok(&self.orders, &id, &ship, &ctx()).await?;
            if rng.f64() < 0.03 {
                let cancel = OrderCommand::Cancel {
                    reason: "too late".into(),
                };
                self.expect_rejected(&self.orders, &id, &cancel, &ctx())
                    .await?;
            }
            return Ok(finished(OrderStatus::Shipped, total));
        }
        Ok(finished(OrderStatus::Paid, total))
    }
}

/// Registers `config.customers` customers, then runs `config.orders` order
/// lives on `config.concurrency` workers, paced to
/// `config.orders_per_second` when set.
pub async fn run(store: Arc<dyn EventStore>, config: &LoadConfig) -> Result<LoadReport, LoadError> {
    let started = Instant::now();
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut rng = Rng::with_seed(config.seed);
    let registered: Vec<(String, String)> = (1..=config.customers.max(1))
        .map(|n| {
            let region = REGIONS[rng.usize(..REGIONS.len())].to_owned();
            (format!("{run_id}-c{n}"), region)
        })
        .collect();
    let mut orders = CommandHandler::<Order>::new(store.clone());
    if let Some(every) = config.snapshot_every {
        orders = orders.with_snapshots(every);
    }
    let run = Arc::new(Run {
        customers: CommandHandler::new(store.clone()),
        orders,
        counters: Counters::default(),
        registered,
        run_id: run_id.clone(),
    });
    for (n, (id, region)) in run.registered.iter().enumerate() {
        let register = CustomerCommand::Register {
            name: NAMES[n % NAMES.len()].to_owned(),
            region: region.clone(),
        };
        let ctx = CommandContext::new().idempotent(format!("register-{id}"));
        run.expect_ok(&run.customers, id, &register, &ctx).await?;
    }

    let next_order = Arc::new(AtomicUsize::new(0));
    let orders_started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        let (run, next_order, config) = (run.clone(), next_order.clone(), config.clone());
        workers.spawn(async move {
            let mut finished = Vec::new();
            loop {
                let n = next_order.fetch_add(1, Ordering::Relaxed);
                if n >= config.orders {
                    return Ok::<_, LoadError>(finished);
                }
                if let Some(rate) = config.orders_per_second.filter(|r| *r > 0.0) {
                    let due = orders_started + Duration::from_secs_f64(n as f64 / rate);
                    match config.stop.clone() {
                        Some(mut stop) => tokio::select! {
                            _ = tokio::time::sleep_until(due.into()) => {}
                            _ = stop.wait_for(|s| *s) => {}
                        },
                        None => tokio::time::sleep_until(due.into()).await,
                    }
                }
                if config.stop.as_ref().is_some_and(|s| *s.borrow()) {
                    return Ok(finished);
                }
                // Each order's choices depend on the seed and its number
                // only, not on which worker runs it.
                let mut rng = Rng::with_seed(
                    config.seed ^ (n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                finished.push(run.order_life(n + 1, &mut rng).await?);
            }
        });
    }
    let mut report = LoadReport {
        run_id,
        customers: run.registered.len(),
        ..LoadReport::default()
    };
    while let Some(worker) = workers.join_next().await {
        let finished = worker.map_err(|e| LoadError::Unexpected {
            what: "a load worker".into(),
            reason: e.to_string(),
        })??;
        report.orders += finished.len();
        for order in finished {
            let status = format!("{:?}", order.status).to_lowercase();
            *report.statuses.entry(status).or_default() += 1;
            if order.revenue_cents > 0 {
                *report.revenue_cents.entry(order.region).or_default() += order.revenue_cents;
            }
        }
    }
    let c = &run.counters;
    report.commands = c.commands.load(Ordering::Relaxed);
    report.accepted = c.accepted.load(Ordering::Relaxed);
    report.rejected = c.rejected.load(Ordering::Relaxed);
    report.replayed = c.replayed.load(Ordering::Relaxed);
    report.events = c.events.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    Ok(report)
}
