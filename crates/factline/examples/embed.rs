//! Embedding factline in a Rust service: append, read back, subscribe.

use factline::sqlite::SqliteStore;
use factline::{EventData, EventStore, ExpectedVersion, ReadStream, StreamFilter, StreamId};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("orders.db"))?;
    let order = StreamId::new("Order-42")?;
    let placed = EventData::new("OrderPlaced", json!({ "total_cents": 1299 }));
    store
        .append(&order, ExpectedVersion::NoStream, vec![placed])
        .await?;

    // Catch up from the first position, then keep following live appends.
    let mut orders = store.subscribe(StreamFilter::Category("Order".into()), 1);
    let first = orders.next().await?;
    println!(
        "caught up: {} v{} at position {}",
        first.event_type, first.version, first.position
    );

    let paid = EventData::new("OrderPaid", json!({ "amount_cents": 1299 }));
    store
        .append(&order, ExpectedVersion::Exact(1), vec![paid])
        .await?;
    let live = orders.next().await?;
    println!(
        "live: {} v{} at position {}",
        live.event_type, live.version, live.position
    );

    let history = store.read_stream(&order, ReadStream::forwards()).await?;
    println!("Order-42 holds {} events", history.len());
    Ok(())
}
