//! Decisions without a store (given/when/then) and typed events' stored form.

use factline_aggregate::testing::given;
use factline_aggregate::DomainEvent;

use crate::account::*;

#[test]
fn rules_in_given_when_then() {
    given::<Account>([])
        .when(&AccountCommand::Open {
            owner: "ada".into(),
        })
        .then([opened()]);
    given::<Account>([opened()])
        .when(&AccountCommand::Open {
            owner: "bob".into(),
        })
        .then_error(AccountError::AlreadyOpen);
    given::<Account>([])
        .when(&AccountCommand::Deposit { amount: 5 })
        .then_error(AccountError::NotOpen);
    given::<Account>([opened(), AccountEvent::Deposited { amount: 10 }])
        .when(&AccountCommand::Withdraw { amount: 11 })
        .then_error(AccountError::InsufficientFunds {
            balance: 10,
            amount: 11,
        });
    given::<Account>([opened(), AccountEvent::Deposited { amount: 10 }])
        .when(&AccountCommand::Withdraw { amount: 10 })
        .then([AccountEvent::Withdrawn { amount: 10 }]);
    given::<Account>([opened(), AccountEvent::Deposited { amount: 10 }])
        .when(&AccountCommand::TopUp {
            amount: 5,
            target: 10,
        })
        .then_nothing();
    given::<Account>([opened(), AccountEvent::Closed])
        .when(&AccountCommand::Deposit { amount: 1 })
        .then_error(AccountError::NotOpen);
    let state = given::<Account>([opened(), AccountEvent::Deposited { amount: 3 }]);
    assert_eq!(
        state.state(),
        &Account {
            open: true,
            balance: 3
        }
    );
}

#[test]
#[should_panic(expected = "the command emitted other events")]
fn the_fixture_fails_on_other_events() {
    given::<Account>([opened()])
        .when(&AccountCommand::Deposit { amount: 5 })
        .then([AccountEvent::Deposited { amount: 6 }]);
}

#[test]
#[should_panic(expected = "the command was rejected")]
fn the_fixture_fails_on_an_unexpected_rejection() {
    given::<Account>([])
        .when(&AccountCommand::Deposit { amount: 5 })
        .then([AccountEvent::Deposited { amount: 5 }]);
}

#[test]
fn tagged_events_keep_their_type_and_data_apart() {
    let (event_type, data) = AccountEvent::Deposited { amount: 7 }.encode().unwrap();
    assert_eq!(
        (event_type.as_str(), data.as_str()),
        ("Deposited", r#"{"amount":7}"#)
    );
    let (event_type, data) = AccountEvent::Closed.encode().unwrap();
    assert_eq!((event_type.as_str(), data.as_str()), ("Closed", "{}"));
    assert_eq!(
        AccountEvent::decode("Closed", &serde_json::json!({})).unwrap(),
        AccountEvent::Closed
    );
    assert!(AccountEvent::decode("Robbed", &serde_json::json!({})).is_err());
    assert!(AccountEvent::decode("Deposited", &serde_json::json!({"amount": "x"})).is_err());
}
