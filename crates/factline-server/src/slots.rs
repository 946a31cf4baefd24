//! How many subscriptions are open, in all and per token, so that one
//! client cannot hold every socket and task the server has.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::metrics::{SUBSCRIPTIONS, SUBSCRIPTIONS_REFUSED};
use crate::ApiError;

/// The open subscriptions and their caps.
pub(crate) struct Slots {
    max_total: usize,
    max_per_token: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_token: HashMap<String, usize>,
}

/// One open subscription; its slot is given back when this is dropped.
pub(crate) struct Slot {
    slots: Arc<Slots>,
    token: String,
}

impl Slots {
    pub fn new(max_total: usize, max_per_token: usize) -> Arc<Self> {
        Arc::new(Slots {
            max_total: max_total.max(1),
            max_per_token: max_per_token.max(1),
            open: Mutex::default(),
        })
    }

    /// A slot for a subscription of `token` (a token's name, or
    /// `anonymous`): 503 when the server is full, 429 when the token is.
    pub fn take(self: &Arc<Self>, token: &str) -> Result<Slot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.total >= self.max_total {
            metrics::counter!(SUBSCRIPTIONS_REFUSED, "reason" => "server").increment(1);
            return Err(ApiError::Unavailable(format!(
                "the server has {} subscriptions open, as many as it allows; try again later",
                self.max_total
            )));
        }
        let mine = open.per_token.entry(token.to_owned()).or_insert(0);
        if *mine >= self.max_per_token {
            metrics::counter!(SUBSCRIPTIONS_REFUSED, "reason" => "token").increment(1);
            return Err(ApiError::TooMany(format!(
                "this token has {} subscriptions open, as many as one token may; close one first",
                self.max_per_token
            )));
        }
        *mine += 1;
        open.total += 1;
        metrics::gauge!(SUBSCRIPTIONS).increment(1.0);
        Ok(Slot {
            slots: self.clone(),
            token: token.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if let Some(mine) = open.per_token.get_mut(&self.token) {
            *mine -= 1;
            if *mine == 0 {
                open.per_token.remove(&self.token);
            }
        }
        metrics::gauge!(SUBSCRIPTIONS).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_in_all_and_per_token_and_given_back() {
        let slots = Slots::new(3, 2);
        let a1 = slots.take("a").unwrap();
        let _a2 = slots.take("a").unwrap();
        assert!(matches!(slots.take("a"), Err(ApiError::TooMany(_))));
        let _b1 = slots.take("b").unwrap();
        assert!(matches!(slots.take("c"), Err(ApiError::Unavailable(_))));
        drop(a1);
        let _c1 = slots.take("c").unwrap();
        assert!(matches!(slots.take("a"), Err(ApiError::Unavailable(_))));
    }
}
