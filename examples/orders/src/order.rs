//! Orders: placed with lines, then paid, shipped or cancelled.
//!
//! `OrderPlaced` is at schema v2. Version 1 (written by an earlier release)
//! was `{"customer", "items": [{"sku", "qty", "price"}]}` with prices in
//! euros as decimals and no region; [`ORDER_UPCASTERS`] lifts it.

use std::sync::LazyLock;

use factline_aggregate::{tagged_events, Aggregate, Upcasters};
use factline_core::{EventData, Metadata};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Most lines one order may have.
pub const MAX_LINES: usize = 100;

/// The region v1 orders are given: v1 did not record one.
pub const UNKNOWN_REGION: &str = "unknown";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Not placed yet.
    #[default]
    New,
    Placed,
    Paid,
    Shipped,
    Cancelled,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub status: OrderStatus,
    pub customer_id: String,
    pub region: String,
    pub lines: Vec<OrderLine>,
    pub total_cents: u64,
    pub paid_cents: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: u32,
    pub unit_price_cents: u64,
}

impl OrderLine {
    pub fn new(sku: impl Into<String>, quantity: u32, unit_price_cents: u64) -> Self {
        OrderLine {
            sku: sku.into(),
            quantity,
            unit_price_cents,
        }
    }

    pub fn total_cents(&self) -> u64 {
        u64::from(self.quantity).saturating_mul(self.unit_price_cents)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    OrderPlaced {
        customer_id: String,
        region: String,
        lines: Vec<OrderLine>,
        total_cents: u64,
        currency: String,
    },
    OrderPaid {
        amount_cents: u64,
        method: String,
    },
    OrderShipped {
        carrier: String,
    },
    OrderCancelled {
        reason: String,
        /// What was paid and goes back (0 for an unpaid order).
        refund_cents: u64,
    },
}

/// `OrderPlaced` v1 → v2: `customer` becomes `customer_id`, `items` become
/// `lines` with integer cents, and the total and currency are spelled out.
pub static ORDER_UPCASTERS: LazyLock<Upcasters> =
    LazyLock::new(|| Upcasters::new().step("OrderPlaced", 1, order_placed_v1_to_v2));

fn order_placed_v1_to_v2(v1: Value) -> Result<Value, factline_core::StepError> {
    let customer = v1["customer"]
        .as_str()
        .ok_or("v1 OrderPlaced has no customer")?;
    let items = v1["items"]
        .as_array()
        .ok_or("v1 OrderPlaced has no items")?;
    let mut lines = Vec::with_capacity(items.len());
    let mut total: u64 = 0;
    for item in items {
        let sku = item["sku"].as_str().ok_or("a v1 item has no sku")?;
        let quantity = item["qty"].as_u64().ok_or("a v1 item has no qty")?;
        let price = item["price"].as_f64().ok_or("a v1 item has no price")?;
        if !(0.0..=1e13).contains(&price) {
            return Err(format!("a v1 item has an impossible price {price}").into());
        }
        let cents = (price * 100.0).round() as u64;
        total = total.saturating_add(quantity.saturating_mul(cents));
        lines.push(json!({ "sku": sku, "quantity": quantity, "unit_price_cents": cents }));
    }
    Ok(json!({
        "customer_id": customer,
        "region": UNKNOWN_REGION,
        "lines": lines,
        "total_cents": total,
        "currency": "EUR",
    }))
}

tagged_events!(OrderEvent, upcasters = &ORDER_UPCASTERS);

/// An `OrderPlaced` event in its v1 shape, as an earlier release wrote it:
/// `items` of `(sku, qty, price in euros)`.
pub fn legacy_order_placed(customer: &str, items: &[(&str, u32, f64)]) -> EventData {
    let items: Vec<Value> = items
        .iter()
        .map(|(sku, qty, price)| json!({ "sku": sku, "qty": qty, "price": price }))
        .collect();
    EventData::new(
        "OrderPlaced",
        json!({ "customer": customer, "items": items }),
    )
    .with_metadata(Metadata {
        schema_version: 1,
        ..Metadata::default()
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OrderCommand {
    Place {
        customer_id: String,
        region: String,
        lines: Vec<OrderLine>,
    },
    Pay {
        amount_cents: u64,
        method: String,
    },
    Ship {
        carrier: String,
    },
    Cancel {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("the order has already been placed")]
    AlreadyPlaced,
    #[error("the order has not been placed")]
    NotPlaced,
    #[error("an order needs a customer")]
    NoCustomer,
    #[error("an order needs a region")]
    NoRegion,
    #[error("an order needs at least one line")]
    NoLines,
    #[error("an order has at most {MAX_LINES} lines")]
    TooManyLines,
    #[error("a line needs a sku")]
    NoSku,
    #[error("the quantity of {sku} must be at least 1")]
    NoQuantity { sku: String },
    #[error("the order is already paid")]
    AlreadyPaid,
    #[error("the order is due {due_cents} cents, the payment was {offered_cents}")]
    WrongAmount { due_cents: u64, offered_cents: u64 },
    #[error("cannot pay a cancelled order")]
    PayCancelled,
    #[error("cannot ship an unpaid order")]
    NotPaid,
    #[error("cannot ship a cancelled order")]
    ShipCancelled,
    #[error("the order has already been shipped")]
    AlreadyShipped,
    #[error("cannot cancel a shipped order")]
    CancelShipped,
    #[error("the order is already cancelled")]
    AlreadyCancelled,
    #[error("a cancellation needs a reason")]
    NoReason,
}

impl Aggregate for Order {
    const CATEGORY: &'static str = "Order";
    type Event = OrderEvent;
    type Command = OrderCommand;
    type Error = OrderError;

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderPlaced {
                customer_id,
                region,
                lines,
                total_cents,
                ..
            } => {
                self.status = OrderStatus::Placed;
                self.customer_id = customer_id.clone();
                self.region = region.clone();
                self.lines = lines.clone();
                self.total_cents = *total_cents;
            }
            OrderEvent::OrderPaid { amount_cents, .. } => {
                self.status = OrderStatus::Paid;
                self.paid_cents += amount_cents;
            }
            OrderEvent::OrderShipped { .. } => self.status = OrderStatus::Shipped,
            OrderEvent::OrderCancelled { refund_cents, .. } => {
                self.status = OrderStatus::Cancelled;
                self.paid_cents = self.paid_cents.saturating_sub(*refund_cents);
            }
        }
    }

    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderStatus::*;
        match (command, self.status) {
            (
                OrderCommand::Place {
                    customer_id,
                    region,
                    lines,
                },
                New,
            ) => place(customer_id, region, lines),
            (OrderCommand::Place { .. }, _) => Err(OrderError::AlreadyPlaced),
            (_, New) => Err(OrderError::NotPlaced),

            (OrderCommand::Pay { .. }, Cancelled) => Err(OrderError::PayCancelled),
            (OrderCommand::Pay { .. }, Paid | Shipped) => Err(OrderError::AlreadyPaid),
            (OrderCommand::Pay { amount_cents, .. }, Placed)
                if *amount_cents != self.total_cents =>
            {
                Err(OrderError::WrongAmount {
                    due_cents: self.total_cents,
                    offered_cents: *amount_cents,
                })
            }
            (
                OrderCommand::Pay {
                    amount_cents,
                    method,
                },
                Placed,
            ) => Ok(vec![OrderEvent::OrderPaid {
                amount_cents: *amount_cents,
                method: method.clone(),
            }]),

            (OrderCommand::Ship { .. }, Placed) => Err(OrderError::NotPaid),
            (OrderCommand::Ship { .. }, Cancelled) => Err(OrderError::ShipCancelled),
            (OrderCommand::Ship { .. }, Shipped) => Err(OrderError::AlreadyShipped),
            (OrderCommand::Ship { carrier }, Paid) => Ok(vec![OrderEvent::OrderShipped {
                carrier: carrier.clone(),
            }]),

            (OrderCommand::Cancel { .. }, Shipped) => Err(OrderError::CancelShipped),
            (OrderCommand::Cancel { .. }, Cancelled) => Err(OrderError::AlreadyCancelled),
            (OrderCommand::Cancel { reason }, _) if reason.trim().is_empty() => {
                Err(OrderError::NoReason)
            }
            (OrderCommand::Cancel { reason }, Placed | Paid) => {
                Ok(vec![OrderEvent::OrderCancelled {
                    reason: reason.trim().to_owned(),
                    refund_cents: self.paid_cents,
                }])
            }
        }
    }
}

fn place(
    customer_id: &str,
    region: &str,
    lines: &[OrderLine],
) -> Result<Vec<OrderEvent>, OrderError> {
    if customer_id.trim().is_empty() {
        return Err(OrderError::NoCustomer);
    }
    if region.trim().is_empty() {
        return Err(OrderError::NoRegion);
    }
    if lines.is_empty() {
        return Err(OrderError::NoLines);
    }
    if lines.len() > MAX_LINES {
        return Err(OrderError::TooManyLines);
    }
    if lines.iter().any(|l| l.sku.trim().is_empty()) {
        return Err(OrderError::NoSku);
    }
    if let Some(line) = lines.iter().find(|l| l.quantity == 0) {
        return Err(OrderError::NoQuantity {
            sku: line.sku.clone(),
        });
    }
    Ok(vec![OrderEvent::OrderPlaced {
        customer_id: customer_id.trim().to_owned(),
        region: region.trim().to_owned(),
        lines: lines.to_vec(),
        total_cents: lines.iter().map(OrderLine::total_cents).sum(),
        currency: "EUR".to_owned(),
    }])
}
