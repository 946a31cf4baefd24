//! `factline read-models …`: checking a definitions file of declared read
//! models without a store, and printing the JSON Schema editors complete
//! such files with.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use factline_read_models::{json_schema, Definitions, LoadError};
use serde_json::json;

use crate::usage;

#[derive(Args, Debug)]
pub struct ReadModelsArgs {
    #[command(subcommand)]
    command: ReadModelsCommand,
}

#[derive(Subcommand, Debug)]
enum ReadModelsCommand {
    /// Check a definitions file without a store: prints what it declares,
    /// or every mistake with its line and column (exit 2).
    Check {
        /// The definitions file (TOML).
        file: PathBuf,
        /// Mistakes as one JSON object on stdout instead of lines on stderr.
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of definitions files, for editors that
    /// complete and check them as you type.
    Schema,
}

pub fn run(args: ReadModelsArgs) -> anyhow::Result<()> {
    match args.command {
        ReadModelsCommand::Schema => {
            // Through a handle: `| head` closing the pipe is an error, not a panic.
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::to_string_pretty(&json_schema())?)?;
            Ok(())
        }
        ReadModelsCommand::Check { file, json } => check(file, json),
    }
}

fn check(file: PathBuf, as_json: bool) -> anyhow::Result<()> {
    let definitions = match Definitions::load(&file) {
        Ok(definitions) => definitions,
        Err(LoadError::Invalid(errors)) if as_json => {
            let errors: Vec<_> = errors
                .0
                .iter()
                .map(|e| json!({ "line": e.line, "column": e.column, "message": e.message }))
                .collect();
            writeln!(
                std::io::stdout().lock(),
                "{}",
                json!({ "file": file, "valid": false, "errors": errors })
            )?;
            let count = errors.len();
            return Err(usage(format!("{}: {count} mistake(s)", file.display())));
        }
        Err(e) => return Err(usage(e.to_string())),
    };
    let read_models: Vec<_> = definitions
        .read_models()
        .iter()
        .map(|m| {
            json!({
                "name": m.name(),
                "version": m.version(),
                "tables": m.tables().iter().map(|t| t.name()).collect::<Vec<_>>(),
                "event_types": m.event_types().collect::<Vec<_>>(),
                "queries": m.queries().iter().map(|q| q.name()).collect::<Vec<_>>(),
                "fingerprint": m.fingerprint(),
            })
        })
        .collect();
    writeln!(
        std::io::stdout().lock(),
        "{}",
        json!({ "file": file, "valid": true, "read_models": read_models })
    )?;
    Ok(())
}
