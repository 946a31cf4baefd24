//! The `factline` command-line tool.
//!
//! Exit codes are a public contract: 0 success, 2 invalid input or usage,
//! 3 version conflict, 4 idempotency mismatch, 1 any other failure.

mod admin_api;
mod bench;
mod catalog;
mod commands;
mod dashboard_bench;
mod demo;
mod http_bench;
mod load_bench;
mod outbox_bench;
mod outbox_cli;
mod projection_bench;
mod projections_cli;
mod read_models_cli;
mod serve;

// An event store allocates and frees many small buffers per append; glibc's
// allocator spends a large share of the CPU on that, mimalloc a small one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use factline::{Location, OpenError, StoreError};

#[derive(Parser, Debug)]
#[command(
    name = "factline",
    version,
    about = "An event store and projection engine for event-sourced CQRS systems"
)]
struct Cli {
    /// Database: a file path (SQLite), a postgres:// URL, or memory:.
    #[arg(long, global = true, env = "FACTLINE_DB", default_value = factline::DEFAULT_DB)]
    db: String,

    /// Which log lines go to stderr: a level (error, warn, info, debug,
    /// trace) or `target=level,…`. Default: info for serve and relay,
    /// warn otherwise.
    #[arg(long, global = true, env = "FACTLINE_LOG")]
    log: Option<String>,

    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, global = true, env = "FACTLINE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the HTTP API (append, read, subscribe by Server-Sent Events),
    /// the admin API, /metrics, /health, /ready and the dashboard; with
    /// --relay and --projections also the outbox relay and the orders
    /// read models.
    Serve(Box<serve::ServeArgs>),
    /// Append one event, or a batch of JSON lines from stdin, to a stream.
    Append(commands::AppendArgs),
    /// Read one stream.
    Read(commands::ReadArgs),
    /// Read all events in global order.
    ReadAll(commands::ReadAllArgs),
    /// Read one category (stream ids `<category>-…`) in global order.
    ReadCategory(commands::ReadCategoryArgs),
    /// Follow a stream, a category or all events live.
    Tail(commands::TailArgs),
    /// Run the orders domain: commands through the command handler, with
    /// the orders read models following live.
    Demo(demo::DemoArgs),
    /// Operate the read models: list, status, rebuild, pause, resume, parked
    /// events.
    Projections(projections_cli::ProjectionsArgs),
    /// Read models declared in a file: check one, print its JSON Schema.
    ReadModels(read_models_cli::ReadModelsArgs),
    /// The transactional outbox: what is published, backlog and relays.
    Outbox(outbox_cli::OutboxArgs),
    /// Publish the outbox to NATS JetStream, a webhook, a file or stdout,
    /// until stopped (Ctrl-C).
    Relay(outbox_cli::RelayArgs),
    /// Measure the store.
    Bench(BenchCommand),
}

#[derive(Args, Debug)]
struct BenchCommand {
    #[command(subcommand)]
    which: bench::Bench,
}

/// Bad input from the user: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

/// A flag's number of seconds, checked to lie in `min..=max` (a usage
/// error otherwise, never a panic on a huge or odd number).
pub fn seconds(flag: &str, value: f64, min: f64, max: f64) -> anyhow::Result<std::time::Duration> {
    if (min..=max).contains(&value) {
        if let Ok(duration) = std::time::Duration::try_from_secs_f64(value) {
            return Ok(duration);
        }
    }
    Err(usage(format!(
        "{flag} must be a number of seconds from {min} to {max}, not {value}"
    )))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = std::io::stdout().flush();
            eprintln!("error: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

/// Log lines go to stderr, so that stdout stays the commands' output.
fn init_logging(cli: &Cli) -> Result<(), String> {
    use tracing_subscriber::prelude::*;
    let default = match cli.command {
        Command::Serve(_) | Command::Relay(_) => "info",
        _ => "warn",
    };
    let spec = cli.log.as_deref().unwrap_or(default);
    let filter: tracing_subscriber::filter::Targets = spec
        .parse()
        .map_err(|e| format!("--log {spec:?} is not a level or target=level list: {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => registry.with(layer).init(),
        LogFormat::Json => registry
            .with(layer.json().with_current_span(true).with_span_list(false))
            .init(),
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let location = Location::parse(&cli.db)?;
    match cli.command {
        Command::Serve(args) => serve::run(&location, *args).await,
        Command::Append(args) => commands::append(&location, args).await,
        Command::Read(args) => commands::read(&location, args).await,
        Command::ReadAll(args) => commands::read_all(&location, args).await,
        Command::ReadCategory(args) => commands::read_category(&location, args).await,
        Command::Tail(args) => commands::tail(&location, args).await,
        Command::Demo(args) => demo::run(&location, args).await,
        Command::Projections(args) => projections_cli::run(args, &location).await,
        Command::ReadModels(args) => read_models_cli::run(args),
        Command::Outbox(args) => outbox_cli::run(args, &location).await,
        Command::Relay(args) => outbox_cli::relay(args, &location).await,
        Command::Bench(b) => bench::run(b.which, &location).await,
    }
}

fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(store) = cause.downcast_ref::<StoreError>() {
            return match store {
                StoreError::Conflict { .. } => 3,
                StoreError::IdempotencyMismatch { .. } | StoreError::CommandKeyReused { .. } => 4,
                StoreError::TooLarge { .. }
                | StoreError::InvalidStreamId(_)
                | StoreError::InvalidInput(_) => 2,
                _ => 1,
            };
        }
        if cause.is::<UsageError>() || cause.is::<factline::InvalidStreamId>() {
            return 2;
        }
        if let Some(OpenError::Invalid(_)) = cause.downcast_ref::<OpenError>() {
            return 2;
        }
    }
    1
}

/// `factline read-all | head` closing the pipe early is not a failure.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every subcommand and every option says what it is for in `--help`.
    #[test]
    fn help_texts_are_complete() {
        fn check(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                let here = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{here} (the command)"));
                }
                check(sub, &here, missing);
            }
        }
        let command = Cli::command();
        command.clone().debug_assert();
        let mut missing = Vec::new();
        check(&command, "factline", &mut missing);
        assert!(missing.is_empty(), "no help text for: {missing:#?}");
    }
}
