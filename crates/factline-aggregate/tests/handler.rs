//! The command handler on every backend: decisions appended with the loaded
//! version, metadata propagated, rejections writing nothing, and version
//! conflicts decided again up to the bound, under real concurrency;
//! idempotency keys, snapshots, upcasting and time travel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use factline_aggregate::testing::given;
use factline_aggregate::{
    tagged_events, Aggregate, AsOf, CommandContext, CommandError, CommandHandler, DecodeError,
    DomainEvent, Failure, UpcastError, Upcasters,
};
use factline_core::{
    AppendResult, Appended, CommandKey, CommandRecord, EventData, EventStore, ExpectedVersion,
    JsonText, Metadata, ReadStream, RecordedEvent, Snapshot, StoreError, StreamFilter, StreamId,
    Subscription, TypedError,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A small account: opened, then deposits and withdrawals that may not
/// overdraw it.
#[derive(Default, Debug, PartialEq, Serialize, Deserialize)]
struct Account {
    open: bool,
    balance: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
enum AccountEvent {
    Opened { owner: String },
    Deposited { amount: i64 },
    Withdrawn { amount: i64 },
    Closed,
}

tagged_events!(AccountEvent, upcasters = &ACCOUNT_UPCASTERS);

/// `Deposited` v1 called its amount `sum`.
static ACCOUNT_UPCASTERS: LazyLock<Upcasters> = LazyLock::new(|| {
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
enum AccountCommand {
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
enum AccountError {
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

fn opened() -> AccountEvent {
    AccountEvent::Opened {
        owner: "ada".into(),
    }
}

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

async fn commands_append_their_decisions_with_metadata(store: Arc<dyn EventStore>) {
    let accounts = CommandHandler::<Account>::new(store.clone());
    let open = CommandContext::new()
        .correlated_with("signup-42")
        .caused_by("request-7")
        .by("ada@example.com")
        .with_header("tenant", "eu");
    let outcome = accounts
        .handle(
            "a1",
            &AccountCommand::Open {
                owner: "ada".into(),
            },
            &open,
        )
        .await
        .unwrap();
    assert_eq!(outcome.stream_id.as_str(), "Account-a1");
    assert_eq!(outcome.attempts, 1);
    assert_eq!(outcome.correlation_id, "signup-42");
    let opened_ids = outcome.event_ids.clone();
    let appended = outcome.appended.unwrap();
    assert_eq!((appended.first_version, appended.last_version), (1, 1));

    // No correlation id given: a fresh one, on every event of the command.
    let deposit = CommandContext::new();
    let outcome = accounts
        .handle("a1", &AccountCommand::Deposit { amount: 10 }, &deposit)
        .await
        .unwrap();
    assert_eq!(outcome.appended.unwrap().last_version, 2);

    let stored = store
        .read_stream(&outcome.stream_id, ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    let first = &stored[0].metadata;
    assert_eq!(first.correlation_id.as_deref(), Some("signup-42"));
    assert_eq!(
        first.causation_id.as_deref(),
        Some(open.command_id.to_string().as_str())
    );
    assert_eq!(first.headers["actor"], "ada@example.com");
    assert_eq!(first.headers["tenant"], "eu");
    assert_eq!(first.headers["command_causation_id"], "request-7");
    assert_eq!(vec![stored[0].event_id], opened_ids);
    let second = &stored[1].metadata;
    assert_eq!(
        second.correlation_id.as_deref(),
        Some(outcome.correlation_id.as_str())
    );
    assert_ne!(outcome.correlation_id, "signup-42");
    assert_eq!(
        second.causation_id.as_deref(),
        Some(deposit.command_id.to_string().as_str())
    );
    assert_eq!(stored[1].event_id, outcome.event_ids[0]);
    assert_eq!(stored[1].event_type, "Deposited");

    let loaded = accounts.load("a1").await.unwrap();
    assert_eq!(loaded.version, 2);
    assert_eq!(
        loaded.state,
        Account {
            open: true,
            balance: 10
        }
    );
    // A command that decides nothing appends nothing.
    let nothing = accounts
        .handle(
            "a1",
            &AccountCommand::TopUp {
                amount: 5,
                target: 10,
            },
            &CommandContext::new(),
        )
        .await
        .unwrap();
    assert_eq!((nothing.appended, nothing.event_ids.len()), (None, 0));
    assert_eq!(accounts.load("a1").await.unwrap().version, 2);
}

async fn rejected_commands_write_nothing(store: Arc<dyn EventStore>) {
    let accounts = CommandHandler::<Account>::new(store.clone());
    let context = CommandContext::new();
    match accounts
        .handle("b1", &AccountCommand::Deposit { amount: 1 }, &context)
        .await
    {
        Err(CommandError::Rejected(AccountError::NotOpen)) => {}
        other => panic!("expected NotOpen, got {other:?}"),
    }
    accounts
        .handle("b1", &AccountCommand::Open { owner: "bo".into() }, &context)
        .await
        .unwrap();
    match accounts
        .handle("b1", &AccountCommand::Withdraw { amount: 1 }, &context)
        .await
    {
        Err(CommandError::Rejected(AccountError::InsufficientFunds {
            balance: 0,
            amount: 1,
        })) => {}
        other => panic!("expected InsufficientFunds, got {other:?}"),
    }
    assert_eq!(store.head_position().await.unwrap(), 1);
    // An event the aggregate cannot read is a failure, not a rejection.
    let stream = CommandHandler::<Account>::stream_id("b1").unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::Exact(1),
            vec![EventData::new(
                "Deposited",
                serde_json::json!({"amount": "ten"}),
            )],
        )
        .await
        .unwrap();
    match accounts
        .handle("b1", &AccountCommand::Deposit { amount: 1 }, &context)
        .await
    {
        Err(CommandError::Failed(Failure::Decode { version: 2, .. })) => {}
        other => panic!("expected a decode failure, got {other:?}"),
    }
}

/// Concurrent commands on one aggregate from many tasks: each conflict is
/// decided again on fresh state, so with enough attempts every deposit
/// lands once and the balance is exact.
async fn concurrent_commands_decide_again_on_conflicts(store: Arc<dyn EventStore>) {
    let accounts = CommandHandler::<Account>::new(store.clone()).with_max_attempts(100);
    accounts
        .handle(
            "c1",
            &AccountCommand::Open { owner: "cy".into() },
            &CommandContext::new(),
        )
        .await
        .unwrap();
    let tasks: Vec<_> = (1..=16)
        .map(|amount| {
            let accounts = accounts.clone();
            tokio::spawn(async move {
                accounts
                    .handle(
                        "c1",
                        &AccountCommand::Deposit { amount },
                        &CommandContext::new(),
                    )
                    .await
            })
        })
        .collect();
    let mut retried = 0;
    for task in tasks {
        let outcome = task.await.unwrap().unwrap();
        retried += outcome.attempts - 1;
    }
    let loaded = accounts.load("c1").await.unwrap();
    assert_eq!(loaded.version, 17);
    assert_eq!(loaded.state.balance, (1..=16).sum::<i64>());
    let stream = CommandHandler::<Account>::stream_id("c1").unwrap();
    let stored = store
        .read_stream(&stream, ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(stored.len(), 17);
    // Retries happened at all only if tasks really raced; either way the
    // result above is exact. Report it for the log.
    eprintln!("{retried} conflicting decisions were made again");
}

/// A store that lets another writer append to the stream right before
/// each of the first `interfere` appends of the handler: every decision
/// made before that is stale.
struct Interfering {
    inner: Arc<dyn EventStore>,
    interfere: usize,
    done: AtomicUsize,
}

#[async_trait::async_trait]
impl EventStore for Interfering {
    async fn append_command(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
        command: &CommandKey,
    ) -> Result<Appended, StoreError> {
        let inner = &self.inner;
        inner
            .append_command(stream_id, expected, events, command)
            .await
    }
    async fn find_command(&self, key: &str) -> Result<Option<CommandRecord>, StoreError> {
        self.inner.find_command(key).await
    }
    async fn purge_commands(&self) -> Result<u64, StoreError> {
        self.inner.purge_commands().await
    }
    async fn save_snapshot(
        &self,
        stream_id: &StreamId,
        version: u64,
        snapshot_version: u32,
        data: &JsonText,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner
            .save_snapshot(stream_id, version, snapshot_version, data)
            .await
    }
    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load_snapshot(stream_id).await
    }
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult, StoreError> {
        if self.done.fetch_add(1, Ordering::SeqCst) < self.interfere {
            let rival = AccountEvent::Deposited { amount: 1000 };
            let rival = rival.to_event_data(Metadata::default()).unwrap();
            self.inner
                .append(stream_id, ExpectedVersion::Any, vec![rival])
                .await?;
        }
        self.inner.append(stream_id, expected, events).await
    }
    async fn read_stream(
        &self,
        stream_id: &StreamId,
        options: ReadStream,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_stream(stream_id, options).await
    }
    async fn read_filtered(
        &self,
        filter: &StreamFilter,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_filtered(filter, from, limit).await
    }
    async fn head_position(&self) -> Result<u64, StoreError> {
        self.inner.head_position().await
    }
    fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch_head()
    }
    fn subscribe(&self, filter: StreamFilter, from: u64) -> Subscription {
        self.inner.subscribe(filter, from)
    }
}

/// The bound: a command whose every decision goes stale fails with a
/// conflict after exactly the configured attempts (3 by default) and writes
/// nothing; one that goes stale fewer times succeeds on fresh state.
async fn conflicts_are_decided_again_up_to_the_bound(store: Arc<dyn EventStore>) {
    CommandHandler::<Account>::new(store.clone())
        .handle(
            "d1",
            &AccountCommand::Open { owner: "di".into() },
            &CommandContext::new(),
        )
        .await
        .unwrap();
    let always = Arc::new(Interfering {
        inner: store.clone(),
        interfere: usize::MAX,
        done: AtomicUsize::new(0),
    });
    let accounts = CommandHandler::<Account>::new(always.clone());
    match accounts
        .handle(
            "d1",
            &AccountCommand::TopUp {
                amount: 1,
                target: i64::MAX,
            },
            &CommandContext::new(),
        )
        .await
    {
        Err(CommandError::Failed(Failure::Conflict {
            attempts: 3,
            stream_id,
        })) => {
            assert_eq!(stream_id.as_str(), "Account-d1")
        }
        other => panic!("expected a conflict after 3 attempts, got {other:?}"),
    }
    assert_eq!(always.done.load(Ordering::SeqCst), 3);
    // Only the rival's three deposits were written.
    let loaded = CommandHandler::<Account>::new(store.clone())
        .load("d1")
        .await
        .unwrap();
    assert_eq!((loaded.version, loaded.state.balance), (4, 3000));

    let twice = Arc::new(Interfering {
        inner: store.clone(),
        interfere: 2,
        done: AtomicUsize::new(0),
    });
    // Decided on fresh state each time: after the rivals' deposits the
    // balance is 5000, past the target, so the third decision is "nothing".
    let outcome = CommandHandler::<Account>::new(twice)
        .handle(
            "d1",
            &AccountCommand::TopUp {
                amount: 1,
                target: 5000,
            },
            &CommandContext::new(),
        )
        .await
        .unwrap();
    assert_eq!((outcome.attempts, outcome.appended), (3, None));
    let outcome = CommandHandler::<Account>::new(store.clone())
        .with_max_attempts(1)
        .handle(
            "d1",
            &AccountCommand::Withdraw { amount: 5000 },
            &CommandContext::new(),
        )
        .await
        .unwrap();
    assert_eq!(outcome.appended.unwrap().last_version, 7);
}

fn open(owner: &str) -> AccountCommand {
    AccountCommand::Open {
        owner: owner.into(),
    }
}

/// A key runs its command once: repeats get the first outcome, another
/// command under the key is refused, and eight senders at once write once.
async fn idempotent_commands_run_once(store: Arc<dyn EventStore>) {
    let accounts = CommandHandler::<Account>::new(store.clone());
    let ctx = CommandContext::new;
    accounts.handle("i1", &open("ida"), &ctx()).await.unwrap();
    let deposit = AccountCommand::Deposit { amount: 10 };
    let first = accounts
        .handle(
            "i1",
            &deposit,
            &ctx().idempotent("dep-1").correlated_with("c-1"),
        )
        .await
        .unwrap();
    assert!(!first.replayed);
    let again = accounts
        .handle("i1", &deposit, &ctx().idempotent("dep-1"))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.appended, first.appended);
    assert_eq!(again.event_ids, first.event_ids);
    assert_eq!(again.correlation_id, "c-1");
    match accounts
        .handle(
            "i1",
            &AccountCommand::Deposit { amount: 11 },
            &ctx().idempotent("dep-1"),
        )
        .await
    {
        Err(CommandError::KeyReused { key }) => assert_eq!(key, "dep-1"),
        other => panic!("expected KeyReused, got {other:?}"),
    }
    // The same payload for another account is another command too.
    assert!(matches!(
        accounts
            .handle("i2", &deposit, &ctx().idempotent("dep-1"))
            .await,
        Err(CommandError::KeyReused { .. })
    ));
    assert_eq!(accounts.load("i1").await.unwrap().state.balance, 10);

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let accounts = accounts.clone();
        tasks.push(tokio::spawn(async move {
            accounts
                .handle(
                    "i1",
                    &AccountCommand::Deposit { amount: 5 },
                    &CommandContext::new().idempotent("dep-2"),
                )
                .await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap().unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    assert!(outcomes
        .iter()
        .all(|o| o.event_ids == outcomes[0].event_ids));
    let loaded = accounts.load("i1").await.unwrap();
    assert_eq!((loaded.state.balance, loaded.version), (15, 3));
}

/// Loads start from the latest snapshot; a snapshot of another snapshot
/// version, or one that does not decode, is ignored and replaced.
async fn snapshots_shortcut_loads_and_bad_ones_are_replaced(store: Arc<dyn EventStore>) {
    let plain = CommandHandler::<Account>::new(store.clone());
    let snapshotting = CommandHandler::<Account>::new(store.clone()).with_snapshots(10);
    let ctx = CommandContext::new();
    snapshotting.handle("s1", &open("sam"), &ctx).await.unwrap();
    for amount in 1..=24 {
        let deposit = AccountCommand::Deposit { amount };
        snapshotting.handle("s1", &deposit, &ctx).await.unwrap();
    }
    let stream = CommandHandler::<Account>::stream_id("s1").unwrap();
    let kept = store.load_snapshot(&stream).await.unwrap().unwrap();
    assert_eq!((kept.version, kept.snapshot_version), (20, 1));
    let full = plain.load("s1").await.unwrap();
    assert_eq!((full.state.balance, full.version), (300, 25));
    assert_eq!((full.snapshot, full.events_applied), (None, 25));
    let quick = snapshotting.load("s1").await.unwrap();
    assert_eq!((quick.snapshot, quick.events_applied), (Some(20), 5));
    assert_eq!((quick.state, quick.version), (full.state, 25));

    let unusable = [
        (99, json!({"open": true, "balance": 1})),
        (1, json!({"open": "yes", "balance": "lots"})),
    ];
    for (snapshot_version, data) in unusable {
        store
            .save_snapshot(&stream, 25, snapshot_version, &JsonText::from(data))
            .await
            .unwrap();
        let loaded = snapshotting.load("s1").await.unwrap();
        assert_eq!((loaded.snapshot, loaded.events_applied), (None, 25));
        assert_eq!(loaded.state.balance, 300);
        let replaced = store.load_snapshot(&stream).await.unwrap().unwrap();
        assert_eq!((replaced.version, replaced.snapshot_version), (25, 1));
        assert_eq!(replaced.data, json!({"open": true, "balance": 300}));
        let next = snapshotting.load("s1").await.unwrap();
        assert_eq!((next.snapshot, next.events_applied), (Some(25), 0));
    }
}

/// `Deposited` stored in its v1 shape reads as the current event on the
/// handler's load and on a typed subscription; the stored event stays as it
/// was. A version with no path is a clear error.
async fn stored_v1_events_are_upcast_on_every_typed_read(store: Arc<dyn EventStore>) {
    let accounts = CommandHandler::<Account>::new(store.clone());
    accounts
        .handle("u1", &open("uma"), &CommandContext::new())
        .await
        .unwrap();
    let stream = CommandHandler::<Account>::stream_id("u1").unwrap();
    let v1 = |sum: i64| {
        EventData::new("Deposited", json!({ "sum": sum })).with_metadata(Metadata {
            schema_version: 1,
            ..Metadata::default()
        })
    };
    store
        .append(&stream, ExpectedVersion::Exact(1), vec![v1(7), v1(8)])
        .await
        .unwrap();
    accounts
        .handle(
            "u1",
            &AccountCommand::Deposit { amount: 5 },
            &CommandContext::new(),
        )
        .await
        .unwrap();
    assert_eq!(accounts.load("u1").await.unwrap().state.balance, 20);

    let stored = store
        .read_stream(&stream, ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(
        stored[1].data,
        json!({"sum": 7}),
        "stored events are never rewritten"
    );
    assert_eq!(stored[1].metadata.schema_version, 1);
    assert_eq!(stored[3].data, json!({"amount": 5}));
    assert_eq!(
        stored[3].metadata.schema_version, 2,
        "new events carry the current version"
    );

    let mut subscription = store.subscribe(StreamFilter::Stream(stream.clone()), 1);
    let mut typed = Vec::new();
    for _ in 0..4 {
        typed.push(subscription.next_typed::<AccountEvent>().await.unwrap().1);
    }
    assert_eq!(
        typed[1..],
        [
            AccountEvent::Deposited { amount: 7 },
            AccountEvent::Deposited { amount: 8 },
            AccountEvent::Deposited { amount: 5 },
        ]
    );

    let future = EventData::new("Deposited", json!({"amount": 1})).with_metadata(Metadata {
        schema_version: 3,
        ..Metadata::default()
    });
    store
        .append(&stream, ExpectedVersion::Any, vec![future])
        .await
        .unwrap();
    match accounts.load("u1").await {
        Err(Failure::Decode {
            version: 5,
            source: DecodeError::Upcast(e),
            ..
        }) => {
            assert!(
                matches!(
                    &e,
                    UpcastError::FromTheFuture { event_type, stored: 3, current: 2 }
                        if event_type == "Deposited"
                ),
                "{e:?}"
            );
            assert!(e.to_string().contains("Deposited v3"), "{e}");
        }
        other => panic!("expected a decode failure, got {other:?}"),
    }
    match subscription.next_typed::<AccountEvent>().await {
        Err(TypedError::Decode { position, .. }) => assert_eq!(position, stored[3].position + 1),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

/// An aggregate as of a version, a global position or a time, also when a
/// later snapshot exists.
async fn loads_as_of_version_position_and_time(store: Arc<dyn EventStore>) {
    let accounts = CommandHandler::<Account>::new(store.clone()).with_snapshots(2);
    let other = StreamId::new("Noise-1").unwrap();
    let ctx = CommandContext::new();
    accounts.handle("t1", &open("tia"), &ctx).await.unwrap();
    for amount in [1, 2, 4] {
        // Other streams' events between, so positions and versions differ.
        store
            .append(
                &other,
                ExpectedVersion::Any,
                vec![EventData::new("Noise", json!({}))],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let deposit = AccountCommand::Deposit { amount };
        accounts.handle("t1", &deposit, &ctx).await.unwrap();
    }
    let stream = CommandHandler::<Account>::stream_id("t1").unwrap();
    let events = store
        .read_stream(&stream, ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(
        store.load_snapshot(&stream).await.unwrap().unwrap().version,
        4
    );

    let at = |as_of| accounts.load_as_of("t1", as_of);
    let v2 = at(AsOf::Version(2)).await.unwrap();
    assert_eq!((v2.state.balance, v2.version, v2.snapshot), (1, 2, None));
    let v4 = at(AsOf::Version(4)).await.unwrap();
    assert_eq!((v4.state.balance, v4.snapshot), (7, Some(4)));
    let p = at(AsOf::Position(events[2].position)).await.unwrap();
    assert_eq!((p.state.balance, p.version), (3, 3));
    let between = at(AsOf::Position(events[2].position + 1)).await.unwrap();
    assert_eq!(between.version, 3, "the next position is another stream's");
    let t = at(AsOf::Time(events[1].recorded_at)).await.unwrap();
    assert_eq!((t.state.balance, t.version), (1, 2));
    let before = at(AsOf::Time(
        events[0].recorded_at - chrono::Duration::seconds(1),
    ))
    .await
    .unwrap();
    assert_eq!((before.version, before.state), (0, Account::default()));
    assert_eq!(at(AsOf::Version(99)).await.unwrap().version, 4);
}

factline_conformance::on_every_backend!(
    commands_append_their_decisions_with_metadata,
    rejected_commands_write_nothing,
    concurrent_commands_decide_again_on_conflicts,
    conflicts_are_decided_again_up_to_the_bound,
    idempotent_commands_run_once,
    snapshots_shortcut_loads_and_bad_ones_are_replaced,
    stored_v1_events_are_upcast_on_every_typed_read,
    loads_as_of_version_position_and_time,
);
