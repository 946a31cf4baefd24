//! The integration tests of `factline-outbox`, one test binary with a module
//! per concept (each module says what it checks).

mod nats;
mod outbox;
mod processes;
mod webhook;
