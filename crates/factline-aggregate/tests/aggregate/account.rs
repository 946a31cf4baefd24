//! The account aggregate every test of the command side uses.

use factline_aggregate::{tagged_events, Aggregate, Upcasters};
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;

/// A small account: opened, then deposits and withdrawals that may not
/// overdraw it.
#[derive(Default, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Account {
    pub(crate) open: bool,
    pub(crate) balance: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub(crate) enum AccountEvent {
    Opened { owner: String },
    Deposited { amount: i64 },
    Withdrawn { amount: i64 },
    Closed,
}

tagged_events!(AccountEvent, upcasters = &ACCOUNT_UPCASTERS);

/// `Deposited` v1 called its amount `sum`.
pub(crate) static ACCOUNT_UPCASTERS: LazyLock<Upcasters> = LazyLock::new(|| {
    Upcasters::new().step("Deposited", 1, |mut data| {
        let sum = data
            .as_object_mut()
            .and_then(|o| o.remove("sum"))
            .ok_or("a v1 deposit has a sum")?;
        data["amount"] = sum;
        Ok(data)
    })
});

#[derive(Serialize)]
pub(crate) enum AccountCommand {
    Open {
        owner: String,
    },
    Deposit {
        amount: i64,
    },
    Withdraw {
        amount: i64,
    },
    /// Deposits `amount` unless the balance is already at least `target`.
    TopUp {
        amount: i64,
        target: i64,
    },
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub(crate) enum AccountError {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("amounts must be positive")]
    NotPositive,
    #[error("the balance {balance} does not cover {amount}")]
    InsufficientFunds { balance: i64, amount: i64 },
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "Account";
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = AccountError;

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { .. } => self.open = true,
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
            AccountEvent::Closed => self.open = false,
        }
    }

    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { owner } if !self.open => Ok(vec![AccountEvent::Opened {
                owner: owner.clone(),
            }]),
            AccountCommand::Open { .. } => Err(AccountError::AlreadyOpen),
            _ if !self.open => Err(AccountError::NotOpen),
            AccountCommand::Deposit { amount } | AccountCommand::Withdraw { amount }
                if *amount <= 0 =>
            {
                Err(AccountError::NotPositive)
            }
            AccountCommand::Deposit { amount } => {
                Ok(vec![AccountEvent::Deposited { amount: *amount }])
            }
            AccountCommand::Withdraw { amount } if *amount > self.balance => {
                Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                    amount: *amount,
                })
            }
            AccountCommand::Withdraw { amount } => {
                Ok(vec![AccountEvent::Withdrawn { amount: *amount }])
            }
            AccountCommand::TopUp { target, .. } if self.balance >= *target => Ok(vec![]),
            AccountCommand::TopUp { amount, .. } => {
                Ok(vec![AccountEvent::Deposited { amount: *amount }])
            }
        }
    }
}

pub(crate) fn opened() -> AccountEvent {
    AccountEvent::Opened {
        owner: "ada".into(),
    }
}

pub(crate) fn open(owner: &str) -> AccountCommand {
    AccountCommand::Open {
        owner: owner.into(),
    }
}
