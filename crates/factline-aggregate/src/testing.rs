//! Given/when/then for domain rules, without a store:
//!
//! ```text
//! given::<Order>([placed()]).when(&Ship).then_error(OrderError::NotPaid);
//! ```
//!
//! `then` also checks that every emitted event survives its stored form
//! (encode, then decode, gives the same event), so a serde mistake shows up
//! in the domain's own tests.

use std::fmt::Debug;

use crate::{Aggregate, DomainEvent};

/// An aggregate with these past events applied.
pub fn given<A: Aggregate>(history: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for event in history {
        state.apply(&event);
    }
    Given { state }
}

/// An aggregate's state after the given events; see [`given`].
pub struct Given<A> {
    state: A,
}

impl<A: Aggregate> Given<A> {
    /// Decides `command` against that state.
    pub fn when(self, command: &A::Command) -> Then<A> {
        Then {
            decided: self.state.decide(command),
        }
    }

    /// The folded state, for assertions on it.
    pub fn state(&self) -> &A {
        &self.state
    }
}

/// What a command decided.
pub struct Then<A: Aggregate> {
    decided: Result<Vec<A::Event>, A::Error>,
}

impl<A> Then<A>
where
    A: Aggregate,
    A::Event: PartialEq + Debug,
    A::Error: PartialEq + Debug,
{
    /// Asserts that the command emitted exactly `expected`, in order.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.decided {
            Ok(events) => {
                assert_eq!(events, expected, "the command emitted other events");
                for event in &events {
                    assert_round_trips(event);
                }
            }
            Err(error) => {
                panic!("expected events {expected:?}, the command was rejected: {error:?}")
            }
        }
    }

    /// Asserts that the command was rejected with `expected`.
    #[track_caller]
    pub fn then_error(self, expected: A::Error) {
        match self.decided {
            Ok(events) => panic!("expected the error {expected:?}, the command emitted {events:?}"),
            Err(error) => assert_eq!(error, expected, "the command was rejected otherwise"),
        }
    }

    /// Asserts that the command was accepted and emitted nothing.
    #[track_caller]
    pub fn then_nothing(self) {
        self.then([]);
    }

    /// The decision itself, for assertions the helpers do not cover.
    pub fn decided(self) -> Result<Vec<A::Event>, A::Error> {
        self.decided
    }
}

#[track_caller]
fn assert_round_trips<E: DomainEvent + PartialEq + Debug>(event: &E) {
    let (event_type, data) = event
        .encode()
        .unwrap_or_else(|e| panic!("{event:?} cannot be encoded: {e}"));
    let value = data
        .to_value()
        .unwrap_or_else(|e| panic!("{event:?} stored as {event_type} {data} is not readable: {e}"));
    let decoded = E::decode(&event_type, &value).unwrap_or_else(|e| {
        panic!("{event:?} stored as {event_type} {data} cannot be decoded: {e}")
    });
    assert_eq!(
        &decoded, event,
        "{event_type} {data} decodes to another event"
    );
}
