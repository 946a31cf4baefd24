//! append, read, read-all, read-category and tail.

use std::io::{BufRead, Write};

use anyhow::Context;
use clap::Args;
use factline::{
    EventData, ExpectedVersion, Location, Metadata, ReadStream, RecordedEvent, StreamFilter,
    StreamId,
};
use uuid::Uuid;

use crate::usage;

/// Reads page through the store in chunks of this many events.
const PAGE: usize = 1_000;

#[derive(Args, Debug)]
pub struct AppendArgs {
    /// The stream, e.g. Order-42 (category "Order").
    stream: String,
    /// The event type (single-event mode).
    #[arg(long = "type", required_unless_present = "batch")]
    event_type: Option<String>,
    /// The event's JSON data (default {}).
    #[arg(long, conflicts_with = "batch")]
    data: Option<String>,
    /// The event's metadata as JSON: correlation_id, causation_id, schema_version, headers.
    #[arg(long, conflicts_with = "batch")]
    metadata: Option<String>,
    /// The event id (default: a new UUID). Reusing one makes a retry idempotent.
    #[arg(long, conflicts_with = "batch")]
    event_id: Option<String>,
    /// any, no_stream, stream_exists or the exact current version.
    #[arg(long, default_value = "any")]
    expected_version: String,
    /// Read events from stdin, one JSON object per line
    /// ({"event_id"?, "type", "data"?, "metadata"?}), and append them atomically.
    #[arg(long, conflicts_with = "event_type")]
    batch: bool,
}

fn parse_stream(s: &str) -> anyhow::Result<StreamId> {
    StreamId::new(s).map_err(|e| usage(e.to_string()))
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> anyhow::Result<T> {
    serde_json::from_str(text).map_err(|e| usage(format!("{what} is not valid: {e}")))
}

pub async fn append(location: &Location, args: AppendArgs) -> anyhow::Result<()> {
    let stream_id = parse_stream(&args.stream)?;
    let expected: ExpectedVersion = args
        .expected_version
        .parse()
        .map_err(|e: factline::ParseExpectedVersionError| usage(e.to_string()))?;
    let events = if args.batch {
        read_batch(std::io::stdin().lock())?
    } else {
        let event_type = args.event_type.unwrap_or_default();
        let data = match &args.data {
            Some(text) => parse_json("--data", text)?,
            None => factline::JsonText::empty_object(),
        };
        let metadata: Metadata = match &args.metadata {
            Some(text) => parse_json("--metadata", text)?,
            None => Metadata::default(),
        };
        let event_id = match &args.event_id {
            Some(text) => Uuid::parse_str(text)
                .map_err(|e| usage(format!("--event-id {text:?} is not a UUID: {e}")))?,
            None => factline::new_event_id(),
        };
        vec![EventData {
            event_id,
            event_type,
            data,
            metadata,
        }]
    };
    let store = location.open().await?;
    let result = store.append(&stream_id, expected, events).await?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &result)?;
    writeln!(out)?;
    Ok(())
}

/// Parses JSON lines; blank lines are skipped, any other bad line refuses
/// the whole batch so nothing is half-appended.
fn read_batch(input: impl BufRead) -> anyhow::Result<Vec<EventData>> {
    let mut events = Vec::new();
    for (index, line) in input.lines().enumerate() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        events.push(parse_json(
            &format!("line {} of the batch", index + 1),
            &line,
        )?);
    }
    if events.is_empty() {
        return Err(usage("--batch read no events from stdin"));
    }
    Ok(events)
}

#[derive(Args, Debug)]
pub struct ReadArgs {
    /// The stream to read (`Category-id`).
    stream: String,
    /// First version to return (inclusive); default: the start, or the end with --backwards.
    #[arg(long)]
    from: Option<u64>,
    /// Read from newest to oldest.
    #[arg(long)]
    backwards: bool,
    /// Return at most this many events.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Args, Debug)]
pub struct ReadAllArgs {
    /// First global position to return (inclusive).
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// Return at most this many events.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Args, Debug)]
pub struct ReadCategoryArgs {
    /// The category: the part of stream ids before their first '-'.
    category: String,
    /// First global position to return (inclusive).
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// Return at most this many events.
    #[arg(long)]
    limit: Option<usize>,
}

fn print_event(out: &mut impl Write, event: &RecordedEvent) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, event)?;
    writeln!(out)?;
    Ok(())
}

pub async fn read(location: &Location, args: ReadArgs) -> anyhow::Result<()> {
    let stream_id = parse_stream(&args.stream)?;
    let store = location.open().await?;
    let mut remaining = args.limit.unwrap_or(usize::MAX);
    let mut from = args.from;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    while remaining > 0 {
        let options = if args.backwards {
            ReadStream::backwards()
        } else {
            ReadStream::forwards()
        };
        let options = ReadStream {
            from_version: from,
            limit: remaining.min(PAGE),
            ..options
        };
        let page = store.read_stream(&stream_id, options).await?;
        for event in &page {
            print_event(&mut out, event)?;
        }
        remaining -= page.len();
        let next_from = match (page.last(), args.backwards) {
            (Some(last), false) => Some(last.version + 1),
            (Some(last), true) => last.version.checked_sub(1).filter(|&v| v > 0),
            (None, _) => None,
        };
        match next_from {
            Some(version) if page.len() == options.limit => from = Some(version),
            _ => break,
        }
    }
    out.flush()?;
    Ok(())
}

async fn read_filtered(
    location: &Location,
    filter: StreamFilter,
    mut from: u64,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let store = location.open().await?;
    let mut remaining = limit.unwrap_or(usize::MAX);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    while remaining > 0 {
        let want = remaining.min(PAGE);
        let page = store.read_filtered(&filter, from, want).await?;
        for event in &page {
            print_event(&mut out, event)?;
        }
        match page.last() {
            Some(last) if page.len() == want => from = last.position + 1,
            _ => break,
        }
        remaining -= page.len();
    }
    out.flush()?;
    Ok(())
}

pub async fn read_all(location: &Location, args: ReadAllArgs) -> anyhow::Result<()> {
    read_filtered(location, StreamFilter::All, args.from, args.limit).await
}

pub async fn read_category(location: &Location, args: ReadCategoryArgs) -> anyhow::Result<()> {
    let category = parse_category(&args.category)?;
    read_filtered(
        location,
        StreamFilter::Category(category),
        args.from,
        args.limit,
    )
    .await
}

fn parse_category(category: &str) -> anyhow::Result<String> {
    factline::check_category(category).map_err(|e| usage(e.to_string()))?;
    Ok(category.to_string())
}

#[derive(Args, Debug)]
pub struct TailArgs {
    /// Follow this stream.
    #[arg(conflicts_with_all = ["all", "category"])]
    stream: Option<String>,
    /// Follow all events (the default).
    #[arg(long, conflicts_with = "category")]
    all: bool,
    /// Follow one category.
    #[arg(long)]
    category: Option<String>,
    /// First global position to deliver (inclusive); default: only new events.
    #[arg(long)]
    from: Option<u64>,
}

pub async fn tail(location: &Location, args: TailArgs) -> anyhow::Result<()> {
    let filter = match (&args.stream, &args.category) {
        (Some(stream), _) => StreamFilter::Stream(parse_stream(stream)?),
        (_, Some(category)) => StreamFilter::Category(parse_category(category)?),
        _ => StreamFilter::All,
    };
    let store = location.open().await?;
    let from = match args.from {
        Some(from) => from,
        None => store.head_position().await? + 1,
    };
    let mut subscription = store.subscribe(filter, from);
    let mut out = std::io::stdout().lock();
    loop {
        let event = subscription.next().await?;
        print_event(&mut out, &event)?;
        out.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lines_parse_and_errors_name_the_line() {
        let ok = "{\"type\":\"A\"}\n\n{\"type\":\"B\",\"data\":{\"x\":1}}\n";
        let events = read_batch(ok.as_bytes()).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].data.to_value().unwrap()["x"], 1);
        let err = read_batch("{\"type\":\"A\"}\nnot json\n".as_bytes()).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(read_batch("\n".as_bytes()).is_err());
    }
}
