//! Reads, bounded reads and subscriptions.

use super::*;

/// Stream ids are validated when constructed, so a store can never be handed
/// an invalid one; this checks the rules every backend relies on.
pub async fn invalid_stream_ids_cannot_be_constructed<S: EventStore>(store: S) {
    for bad in ["", "$all", "-x", "line\nbreak"] {
        assert!(StreamId::new(bad).is_err(), "{bad:?}");
    }
    assert!(StreamId::new("x".repeat(257)).is_err());
    assert!(serde_json::from_value::<StreamId>(json!("")).is_err());
    assert!(all_events(&store).await.is_empty());
}

pub async fn read_stream_forwards_backwards_from_and_limit<S: EventStore>(store: S) {
    let s = sid("Order-1");
    store.append(&s, ANY, events(0..5)).await.unwrap();
    store
        .append(&sid("Order-2"), ANY, events(0..2))
        .await
        .unwrap();
    store.append(&s, ANY, events(5..10)).await.unwrap();
    let versions = |evs: Vec<RecordedEvent>| evs.iter().map(|e| e.version).collect::<Vec<_>>();
    let read = |o| store.read_stream(&s, o);
    assert_eq!(
        versions(read(ReadStream::forwards()).await.unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        versions(
            read(ReadStream::forwards().from_version(4).limit(3))
                .await
                .unwrap()
        ),
        vec![4, 5, 6]
    );
    assert_eq!(
        versions(read(ReadStream::forwards().from_version(9)).await.unwrap()),
        vec![9, 10]
    );
    assert!(read(ReadStream::forwards().from_version(11))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        versions(read(ReadStream::backwards().limit(3)).await.unwrap()),
        vec![10, 9, 8]
    );
    assert_eq!(
        versions(read(ReadStream::backwards().from_version(2)).await.unwrap()),
        vec![2, 1]
    );
    assert_eq!(
        versions(
            read(ReadStream::backwards().from_version(50).limit(1))
                .await
                .unwrap()
        ),
        vec![10]
    );
    assert!(read(ReadStream::forwards().limit(0))
        .await
        .unwrap()
        .is_empty());
    let data: Vec<_> = read(ReadStream::forwards())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.data.to_value().unwrap()["n"].as_u64().unwrap())
        .collect();
    assert_eq!(data, (0..10).collect::<Vec<_>>());
}

pub async fn read_missing_stream_is_empty<S: EventStore>(store: S) {
    store
        .append(&sid("Order-1"), ANY, events(0..1))
        .await
        .unwrap();
    let read = store
        .read_stream(&sid("Order-404"), ReadStream::forwards())
        .await
        .unwrap();
    assert!(read.is_empty());
    let read = store
        .read_stream(&sid("Order-404"), ReadStream::backwards())
        .await
        .unwrap();
    assert!(read.is_empty());
}

pub async fn read_all_positions_strictly_increase_with_from_and_limit<S: EventStore>(store: S) {
    for i in 0..20 {
        store
            .append(&sid(&format!("Order-{}", i % 3)), ANY, events(0..3))
            .await
            .unwrap();
    }
    let all = all_events(&store).await;
    assert_eq!(all.len(), 60);
    assert_eq!(all[0].position, 1);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    let page = store.read_all(all[10].position, 5).await.unwrap();
    assert_eq!(page, all[10..15].to_vec());
    assert!(store
        .read_all(all[59].position + 1, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.read_all(0, 1).await.unwrap(), all[..1].to_vec());
    assert_eq!(store.head_position().await.unwrap(), all[59].position);
}

pub async fn read_category_returns_only_that_category<S: EventStore>(store: S) {
    for i in 0..10 {
        store
            .append(&sid(&format!("Order-{i}")), ANY, events(0..2))
            .await
            .unwrap();
        store
            .append(&sid(&format!("Customer-{i}")), ANY, events(0..1))
            .await
            .unwrap();
        store
            .append(&sid("Orderly"), ANY, events(0..1))
            .await
            .unwrap();
    }
    let orders = store.read_category("Order", 1, usize::MAX).await.unwrap();
    assert_eq!(orders.len(), 20);
    assert!(orders.iter().all(|e| e.stream_id.category() == "Order"));
    assert!(orders.windows(2).all(|w| w[0].position < w[1].position));
    let page = store
        .read_category("Order", orders[5].position, 4)
        .await
        .unwrap();
    assert_eq!(page, orders[5..9].to_vec());
    assert_eq!(
        store.read_category("Orderly", 1, 100).await.unwrap().len(),
        10
    );
    assert!(store
        .read_category("Nothing", 1, 100)
        .await
        .unwrap()
        .is_empty());
}

pub async fn metadata_and_data_round_trip<S: EventStore>(store: S) {
    let mut metadata = Metadata {
        correlation_id: Some("corr-1".into()),
        causation_id: Some(Uuid::new_v4().to_string()),
        schema_version: 3,
        ..Metadata::default()
    };
    metadata.headers.insert("user".into(), "zoë".into());
    metadata
        .headers
        .insert("trace".into(), "a=b; c=\"d\"".into());
    let data = json!({ "unicode": "日本語 ✓", "nested": { "list": [1, 2.5, null, true] }, "big": u64::MAX });
    let sent = EventData::new("Shaped", data.clone()).with_metadata(metadata.clone());
    let before = std::time::SystemTime::now();
    store
        .append(
            &sid("Order-1"),
            ANY,
            vec![sent.clone(), EventData::new("Bare", json!(42))],
        )
        .await
        .unwrap();
    let read = store
        .read_stream(&sid("Order-1"), ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(read[0].event_id, sent.event_id);
    assert_eq!(read[0].event_type, "Shaped");
    assert_eq!(read[0].data, data);
    assert_eq!(read[0].metadata, metadata);
    assert_eq!(read[1].data, json!(42));
    assert_eq!(read[1].metadata, Metadata::default());
    let recorded: std::time::SystemTime = read[0].recorded_at.into();
    let skew = Duration::from_secs(5);
    assert!(recorded + skew >= before && recorded <= std::time::SystemTime::now() + skew);
}

/// Collects `count` events from a subscription, failing after a generous
/// deadline instead of hanging the suite.
async fn collect(sub: &mut factline_core::Subscription, count: usize) -> Vec<RecordedEvent> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        match tokio::time::timeout(Duration::from_secs(60), sub.next()).await {
            Ok(Ok(e)) => got.push(e),
            Ok(Err(e)) => panic!("subscription failed after {} events: {e}", got.len()),
            Err(_) => panic!("subscription stalled after {} of {count} events", got.len()),
        }
    }
    got
}

pub async fn subscription_catches_up_then_goes_live_under_concurrent_writes<
    S: EventStore + Clone,
>(
    store: S,
) {
    const WRITERS: u64 = 8;
    const TOTAL: u64 = 10_000;
    const HISTORY: u64 = 400;
    const PER_WRITER: u64 = (TOTAL - HISTORY) / WRITERS;
    const _: () = assert!(HISTORY + PER_WRITER * WRITERS == TOTAL);
    // Some history first, so the subscription starts in catch-up mode.
    store
        .append(&sid("Order-history"), ANY, events(0..HISTORY))
        .await
        .unwrap();
    let mut sub = store.subscribe(StreamFilter::All, 1);
    let head_before = collect(&mut sub, 100).await;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while i < PER_WRITER {
                let n = (i % 7 + 1).min(PER_WRITER - i);
                store
                    .append(
                        &sid(&format!("Order-w{w}-{}", i % 13)),
                        ANY,
                        events(i..i + n),
                    )
                    .await
                    .unwrap();
                i += n;
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let mut got = head_before;
    got.extend(collect(&mut sub, TOTAL as usize - 100 - 4).await);
    for w in writers {
        w.await.unwrap();
    }
    got.extend(collect(&mut sub, 4).await);
    let stored = all_events(&store).await;
    assert_eq!(stored.len(), TOTAL as usize);
    assert_eq!(got.len(), stored.len());
    let ids = |v: &[RecordedEvent]| {
        v.iter()
            .map(|e| (e.position, e.event_id))
            .collect::<Vec<_>>()
    };
    assert!(
        ids(&got) == ids(&stored),
        "subscription order differs from $all"
    );
    // Nothing more is delivered once caught up.
    let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(extra.is_err(), "unexpected extra event {extra:?}");
}

pub async fn subscription_to_category_and_stream_filters_and_resumes<S: EventStore + Clone>(
    store: S,
) {
    let target = sid("Order-7");
    for i in 0..30 {
        store
            .append(&sid(&format!("Order-{}", i % 10)), ANY, events(0..1))
            .await
            .unwrap();
        store
            .append(&sid(&format!("Customer-{i}")), ANY, events(0..1))
            .await
            .unwrap();
    }
    let mut cat = store.subscribe(StreamFilter::Category("Order".into()), 1);
    let mut one = store.subscribe(StreamFilter::Stream(target.clone()), 1);
    let orders = collect(&mut cat, 30).await;
    assert!(orders.iter().all(|e| e.stream_id.category() == "Order"));
    let mine = collect(&mut one, 3).await;
    assert!(mine.iter().all(|e| e.stream_id == target));
    assert_eq!(
        mine.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Live: a write to the target stream reaches both, a customer write neither.
    let writer = store.clone();
    let t = target.clone();
    let live = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer
            .append(&sid("Customer-live"), ANY, events(0..1))
            .await
            .unwrap();
        writer.append(&t, ANY, events(0..1)).await.unwrap()
    });
    let next_cat = collect(&mut cat, 1).await.remove(0);
    let next_one = collect(&mut one, 1).await.remove(0);
    let appended = live.await.unwrap();
    assert_eq!(next_cat.position, appended.first_position);
    assert_eq!(next_one.position, appended.first_position);
    assert_eq!(next_one.version, 4);
    // Resuming after a delivered position continues exactly there.
    let mut resumed = store.subscribe(
        StreamFilter::Category("Order".into()),
        orders[9].position + 1,
    );
    let rest = collect(&mut resumed, 21).await;
    let expect: Vec<u64> = orders[10..]
        .iter()
        .map(|e| e.position)
        .chain([appended.first_position])
        .collect();
    assert_eq!(rest.iter().map(|e| e.position).collect::<Vec<_>>(), expect);
    let unique: HashSet<_> = rest.iter().map(|e| e.event_id).collect();
    assert_eq!(unique.len(), rest.len());
}

/// Any valid JSON is stored as sent, including escapes some databases'
/// JSON types refuse (`\u0000`) and deep nesting.
pub async fn any_valid_json_round_trips<S: EventStore>(store: S) {
    let mut deep = json!("bottom");
    for _ in 0..64 {
        deep = json!([deep]);
    }
    let data =
        json!({ "nul": "a\u{0}b", "escapes": "\"\\/\n\t\u{1f}", "deep": deep, "neg": -1.5e300 });
    let sent = EventData::new("Odd", data.clone());
    store
        .append(&sid("Odd-1"), ANY, vec![sent.clone()])
        .await
        .unwrap();
    let read = store
        .read_stream(&sid("Odd-1"), ReadStream::forwards())
        .await
        .unwrap();
    assert_eq!(read[0].data, data);
}

/// Bounded reads stop at the event that crosses the byte budget, keep
/// their limit, filter and direction, and always return one event when
/// any matches; the pages join up to the whole.
pub async fn bounded_reads_stop_at_the_byte_budget<S: EventStore>(store: S) {
    for i in 0..40u64 {
        let stream = if i % 2 == 0 { "Big-1" } else { "Small-1" };
        let size = if i % 2 == 0 { 1000 + i as usize } else { 10 };
        let e = EventData::new("Sized", json!({ "i": i, "pad": "x".repeat(size) }));
        store.append(&sid(stream), ANY, vec![e]).await.unwrap();
    }
    let all = all_events(&store).await;
    let expected = |events: &[RecordedEvent], limit: usize, budget: usize| {
        let mut bytes = 0;
        let mut n = 0;
        for e in events.iter().take(limit) {
            n += 1;
            bytes += e.text_len();
            if bytes >= budget {
                break;
            }
        }
        n
    };
    for (limit, budget) in [
        (100, 1),
        (100, 2500),
        (100, 10_000),
        (5, 1_000_000),
        (100, usize::MAX),
    ] {
        let page = store
            .read_filtered_bounded(&StreamFilter::All, 1, limit, budget)
            .await
            .unwrap();
        assert_eq!(
            page.len(),
            expected(&all, limit, budget),
            "limit {limit}, budget {budget}"
        );
        assert_eq!(page, all[..page.len()].to_vec());
    }
    // Paging on from the last position reads everything exactly once.
    let mut paged = Vec::new();
    loop {
        let from = paged.last().map_or(1, |e: &RecordedEvent| e.position + 1);
        let page = store
            .read_filtered_bounded(&StreamFilter::All, from, 1000, 3000)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        paged.extend(page);
    }
    assert_eq!(paged, all);
    let big: Vec<_> = all
        .iter()
        .filter(|e| e.stream_id.as_str() == "Big-1")
        .cloned()
        .collect();
    let page = store
        .read_filtered_bounded(&StreamFilter::Category("Big".into()), 1, 100, 3500)
        .await
        .unwrap();
    assert_eq!(page, big[..expected(&big, 100, 3500)].to_vec());
    let backwards = store
        .read_stream_bounded(
            &sid("Big-1"),
            ReadStream {
                direction: Direction::Backwards,
                from_version: None,
                limit: 100,
            },
            2500,
        )
        .await
        .unwrap();
    let reversed: Vec<_> = big.iter().rev().cloned().collect();
    assert_eq!(
        backwards,
        reversed[..expected(&reversed, 100, 2500)].to_vec()
    );
    let forwards = store
        .read_stream_bounded(&sid("Big-1"), ReadStream::forwards(), 1)
        .await
        .unwrap();
    assert_eq!(forwards, big[..1].to_vec());
}

pub async fn tally_counts_events_by_category_and_type_in_bounded_steps<S: EventStore>(store: S) {
    let empty = store.tally(0, 100).await.unwrap();
    assert_eq!((empty.upto, empty.rows.len()), (0, 0));
    let typed = |t: &str, n: u64| EventData::new(t, json!({ "n": n }));
    let shared = &store;
    let append = |id: &str, evs: Vec<EventData>| {
        let id = sid(id);
        async move { shared.append(&id, ANY, evs).await.unwrap() }
    };
    append("Invoice-1", vec![typed("Issued", 1), typed("Paid", 2)]).await;
    append("Invoice-2", vec![typed("Issued", 3)]).await;
    append("Ticket-9", vec![typed("Opened", 4), typed("Closed", 5)]).await;
    append("Invoice-1", vec![typed("Refunded", 6)]).await;
    append("standalone", vec![typed("Issued", 7)]).await;

    // Counted whole, and in steps of two positions that add up to the same.
    let sorted = |mut rows: Vec<TallyRow>| {
        rows.sort_by(|a, b| (&a.category, &a.event_type).cmp(&(&b.category, &b.event_type)));
        rows.into_iter()
            .map(|r| (r.category, r.event_type, r.events, r.streams_started))
            .collect::<Vec<_>>()
    };
    let whole = store.tally(0, u64::MAX).await.unwrap();
    assert_eq!(whole.upto, 7);
    let expected = vec![
        ("Invoice".to_owned(), "Issued".to_owned(), 2, 2),
        ("Invoice".to_owned(), "Paid".to_owned(), 1, 0),
        ("Invoice".to_owned(), "Refunded".to_owned(), 1, 0),
        ("Ticket".to_owned(), "Closed".to_owned(), 1, 0),
        ("Ticket".to_owned(), "Opened".to_owned(), 1, 1),
        ("standalone".to_owned(), "Issued".to_owned(), 1, 1),
    ];
    assert_eq!(sorted(whole.rows), expected);

    let mut running = Tally::new(0);
    let mut steps = 0;
    while running.upto < 7 {
        let step = store.tally(running.upto, 2).await.unwrap();
        assert!(
            step.upto <= running.upto + 2,
            "a step counts at most two positions"
        );
        assert!(step.rows.iter().map(|r| r.events).sum::<u64>() <= 2);
        for row in &step.rows {
            running.count(
                &row.category,
                &row.event_type,
                row.events,
                row.streams_started,
            );
        }
        running.upto = step.upto;
        steps += 1;
    }
    assert_eq!(steps, 4);
    assert_eq!(sorted(running.rows), expected);
    let done = store.tally(7, 100).await.unwrap();
    assert_eq!((done.upto, done.rows.len()), (7, 0));
}
