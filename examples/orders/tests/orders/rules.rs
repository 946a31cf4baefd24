//! The orders domain's rules, given/when/then, without a store; and the
//! v1 → v2 upcaster of `OrderPlaced`.

use factline_aggregate::testing::given;
use factline_aggregate::{DomainEvent, UpcastError};
use factline_core::{RecordedEvent, StreamId};
use factline_orders::order::{legacy_order_placed, MAX_LINES, UNKNOWN_REGION};
use factline_orders::{
    Customer, CustomerCommand, CustomerError, CustomerEvent, Order, OrderCommand, OrderError,
    OrderEvent, OrderLine,
};
use serde_json::json;

fn lines() -> Vec<OrderLine> {
    vec![
        OrderLine::new("SKU-KEYBOARD", 2, 8_900),
        OrderLine::new("SKU-CABLE", 1, 1_200),
    ]
}

fn place() -> OrderCommand {
    OrderCommand::Place {
        customer_id: "c1".into(),
        region: "eu-west".into(),
        lines: lines(),
    }
}

fn placed() -> OrderEvent {
    OrderEvent::OrderPlaced {
        customer_id: "c1".into(),
        region: "eu-west".into(),
        lines: lines(),
        total_cents: 19_000,
        currency: "EUR".into(),
    }
}

fn pay(amount_cents: u64) -> OrderCommand {
    OrderCommand::Pay {
        amount_cents,
        method: "card".into(),
    }
}

fn paid() -> OrderEvent {
    OrderEvent::OrderPaid {
        amount_cents: 19_000,
        method: "card".into(),
    }
}

fn ship() -> OrderCommand {
    OrderCommand::Ship {
        carrier: "post".into(),
    }
}

fn shipped() -> OrderEvent {
    OrderEvent::OrderShipped {
        carrier: "post".into(),
    }
}

fn cancel(reason: &str) -> OrderCommand {
    OrderCommand::Cancel {
        reason: reason.into(),
    }
}

fn cancelled(refund_cents: u64) -> OrderEvent {
    OrderEvent::OrderCancelled {
        reason: "changed my mind".into(),
        refund_cents,
    }
}

#[test]
fn placing_totals_the_lines_and_checks_them() {
    given::<Order>([]).when(&place()).then([placed()]);
    given::<Order>([placed()])
        .when(&place())
        .then_error(OrderError::AlreadyPlaced);
    let with = |customer: &str, region: &str, lines: Vec<OrderLine>| OrderCommand::Place {
        customer_id: customer.into(),
        region: region.into(),
        lines,
    };
    given::<Order>([])
        .when(&with(" ", "eu-west", lines()))
        .then_error(OrderError::NoCustomer);
    given::<Order>([])
        .when(&with("c1", "", lines()))
        .then_error(OrderError::NoRegion);
    given::<Order>([])
        .when(&with("c1", "eu-west", vec![]))
        .then_error(OrderError::NoLines);
    given::<Order>([])
        .when(&with(
            "c1",
            "eu-west",
            vec![OrderLine::new("SKU-CABLE", 1, 1); MAX_LINES + 1],
        ))
        .then_error(OrderError::TooManyLines);
    given::<Order>([])
        .when(&with("c1", "eu-west", vec![OrderLine::new("", 1, 100)]))
        .then_error(OrderError::NoSku);
    given::<Order>([])
        .when(&with(
            "c1",
            "eu-west",
            vec![
                OrderLine::new("SKU-A", 1, 100),
                OrderLine::new("SKU-B", 0, 100),
            ],
        ))
        .then_error(OrderError::NoQuantity {
            sku: "SKU-B".into(),
        });
    let state = given::<Order>([placed()]);
    assert_eq!(state.state().total_cents, 19_000);
    assert_eq!(state.state().lines.len(), 2);
}

#[test]
fn nothing_but_placing_works_on_an_order_not_placed() {
    for command in [pay(1), ship(), cancel("why")] {
        given::<Order>([])
            .when(&command)
            .then_error(OrderError::NotPlaced);
    }
}

#[test]
fn paying_needs_the_exact_total_once_and_not_after_cancelling() {
    given::<Order>([placed()]).when(&pay(19_000)).then([paid()]);
    given::<Order>([placed()])
        .when(&pay(18_999))
        .then_error(OrderError::WrongAmount {
            due_cents: 19_000,
            offered_cents: 18_999,
        });
    given::<Order>([placed(), paid()])
        .when(&pay(19_000))
        .then_error(OrderError::AlreadyPaid);
    given::<Order>([placed(), paid(), shipped()])
        .when(&pay(19_000))
        .then_error(OrderError::AlreadyPaid);
    given::<Order>([placed(), cancelled(0)])
        .when(&pay(19_000))
        .then_error(OrderError::PayCancelled);
}

#[test]
fn shipping_needs_a_paid_order() {
    given::<Order>([placed(), paid()])
        .when(&ship())
        .then([shipped()]);
    given::<Order>([placed()])
        .when(&ship())
        .then_error(OrderError::NotPaid);
    given::<Order>([placed(), paid(), shipped()])
        .when(&ship())
        .then_error(OrderError::AlreadyShipped);
    given::<Order>([placed(), paid(), cancelled(19_000)])
        .when(&ship())
        .then_error(OrderError::ShipCancelled);
}

#[test]
fn cancelling_refunds_what_was_paid_and_never_a_shipped_order() {
    given::<Order>([placed()])
        .when(&cancel(" changed my mind "))
        .then([cancelled(0)]);
    given::<Order>([placed(), paid()])
        .when(&cancel("changed my mind"))
        .then([cancelled(19_000)]);
    given::<Order>([placed(), paid(), shipped()])
        .when(&cancel("changed my mind"))
        .then_error(OrderError::CancelShipped);
    given::<Order>([placed(), cancelled(0)])
        .when(&cancel("again"))
        .then_error(OrderError::AlreadyCancelled);
    given::<Order>([placed()])
        .when(&cancel("  "))
        .then_error(OrderError::NoReason);
    let refunded = given::<Order>([placed(), paid(), cancelled(19_000)]);
    assert_eq!(refunded.state().paid_cents, 0);
}

#[test]
fn customers_register_once_and_move_between_regions() {
    let register = |name: &str, region: &str| CustomerCommand::Register {
        name: name.into(),
        region: region.into(),
    };
    let registered = CustomerEvent::CustomerRegistered {
        name: "ada".into(),
        region: "eu-west".into(),
    };
    given::<Customer>([])
        .when(&register(" ada ", "eu-west"))
        .then([registered.clone()]);
    given::<Customer>([registered.clone()])
        .when(&register("ada", "eu-west"))
        .then_error(CustomerError::AlreadyRegistered);
    given::<Customer>([])
        .when(&register("", "eu-west"))
        .then_error(CustomerError::NoName);
    given::<Customer>([])
        .when(&register("ada", " "))
        .then_error(CustomerError::NoRegion);
    let relocate = |region: &str| CustomerCommand::Relocate {
        region: region.into(),
    };
    given::<Customer>([registered.clone()])
        .when(&relocate("us-east"))
        .then([CustomerEvent::CustomerRelocated {
            from: "eu-west".into(),
            to: "us-east".into(),
        }]);
    given::<Customer>([registered.clone()])
        .when(&relocate("eu-west"))
        .then_error(CustomerError::AlreadyInRegion("eu-west".into()));
    given::<Customer>([])
        .when(&relocate("us-east"))
        .then_error(CustomerError::NotRegistered);
    given::<Customer>([registered])
        .when(&relocate(""))
        .then_error(CustomerError::NoRegion);
}

fn recorded(data: serde_json::Value, schema_version: u32) -> RecordedEvent {
    let metadata = factline_core::Metadata {
        schema_version,
        ..factline_core::Metadata::default()
    };
    RecordedEvent {
        stream_id: StreamId::new("Order-1").unwrap(),
        version: 1,
        position: 1,
        event_id: uuid::Uuid::nil(),
        event_type: "OrderPlaced".into(),
        data: data.into(),
        metadata,
        recorded_at: chrono::Utc::now(),
    }
}

#[test]
fn order_placed_v1_reads_as_v2() {
    let v1 = legacy_order_placed("c7", &[("SKU-DOCK", 2, 155.0), ("SKU-CABLE", 1, 12.005)]);
    assert_eq!(v1.metadata.schema_version, 1);
    let event = OrderEvent::from_recorded(&recorded(v1.data.to_value().unwrap(), 1)).unwrap();
    assert_eq!(
        event,
        OrderEvent::OrderPlaced {
            customer_id: "c7".into(),
            region: UNKNOWN_REGION.into(),
            lines: vec![
                OrderLine::new("SKU-DOCK", 2, 15_500),
                OrderLine::new("SKU-CABLE", 1, 1_201),
            ],
            total_cents: 32_201,
            currency: "EUR".into(),
        }
    );
    // New events are written as v2.
    let data = placed()
        .to_event_data(factline_core::Metadata::default())
        .unwrap();
    assert_eq!(data.metadata.schema_version, 2);

    let broken = recorded(json!({"customer": "c7"}), 1);
    let err = OrderEvent::from_recorded(&broken).unwrap_err();
    assert_eq!(
        err.to_string(),
        "upcasting OrderPlaced from v1 to v2 failed: v1 OrderPlaced has no items"
    );
    let future = recorded(json!({}), 3);
    match OrderEvent::from_recorded(&future) {
        Err(factline_aggregate::DecodeError::Upcast(UpcastError::FromTheFuture {
            stored: 3,
            current: 2,
            ..
        })) => {}
        other => panic!("expected a version error, got {other:?}"),
    }
}
