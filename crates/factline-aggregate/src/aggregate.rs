pub use factline_core::{tagged, DomainEvent};
use serde::Serialize;

/// A consistency boundary: state folded from its own stream's events, and
/// the rules that decide what a command does to it.
///
/// `decide` only looks at the state and the command: every rule is checked
/// before any event exists, so a rejected command emits nothing, and no rule
/// can depend on a read model.
pub trait Aggregate: Default + Send + Sync + 'static {
    /// The aggregate with id `x` lives in stream `<CATEGORY>-x`.
    const CATEGORY: &'static str;
    /// The format of this aggregate's snapshots. Change it whenever the
    /// state's serialised form changes: snapshots of another version are
    /// ignored and replaced.
    const SNAPSHOT_VERSION: u32 = 1;
    /// The aggregate's events: a [`DomainEvent`], typically a tagged enum.
    type Event: DomainEvent;
    /// Commands serialise so that a repeated command can be told from a
    /// different one under the same idempotency key.
    type Command: Serialize + Send + Sync;
    /// A business rejection (not an infrastructure failure).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Folds one event into the state. Events are facts: this never fails.
    fn apply(&mut self, event: &Self::Event);

    /// The events `command` produces from this state, or why it is refused.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
}
