//! factline: an event store and projection engine for event-sourced CQRS
//! systems. This facade re-exports the pieces an application embeds and
//! knows how to open a store from a `--db` style location.
//!
//! Cargo features choose the heavy parts: `sqlite` (default, the embedded
//! store), `postgres`, `server` (the HTTP API), `outbox`, `outbox-nats` and
//! `outbox-webhook`. The command side ([`aggregate`]) and the projection
//! engine ([`projections`]) are always there.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use factline::sqlite::SqliteStore;
//! use factline::{EventData, EventStore, ExpectedVersion, ReadStream, StreamFilter, StreamId};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = SqliteStore::open(dir.path().join("invoices.db")).unwrap();
//! let invoice = StreamId::new("Invoice-42").unwrap();
//! let issued = EventData::new("InvoiceIssued", serde_json::json!({ "cents": 1299 }));
//! store.append(&invoice, ExpectedVersion::NoStream, vec![issued]).await.unwrap();
//!
//! // Catch up from the first position, then keep following live appends.
//! let mut invoices = store.subscribe(StreamFilter::Category("Invoice".into()), 1);
//! assert_eq!(invoices.next().await.unwrap().event_type, "InvoiceIssued");
//!
//! let paid = EventData::new("InvoicePaid", serde_json::json!({ "cents": 1299 }));
//! store.append(&invoice, ExpectedVersion::Exact(1), vec![paid]).await.unwrap();
//! assert_eq!(invoices.next().await.unwrap().event_type, "InvoicePaid");
//! assert_eq!(store.read_stream(&invoice, ReadStream::forwards()).await.unwrap().len(), 2);
//! # });
//! ```

#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use factline_aggregate as aggregate;
pub use factline_core::*;
#[cfg(feature = "outbox")]
pub use factline_outbox as outbox;
#[cfg(feature = "postgres")]
pub use factline_postgres as postgres;
pub use factline_projections as projections;
#[cfg(feature = "server")]
pub use factline_server as server;
#[cfg(feature = "sqlite")]
pub use factline_sqlite as sqlite;

/// Where the CLI keeps its data when neither `--db` nor `FACTLINE_DB` is set.
pub const DEFAULT_DB: &str = "./factline-data/factline.db";

/// A store location as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// A file path: the embedded SQLite store.
    Sqlite(PathBuf),
    /// `memory:`: an in-memory store that lives as long as the process.
    Memory,
    /// A `postgres://` or `postgresql://` URL.
    Postgres(String),
}

/// Why a store location cannot be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("{0:?} is not a database location: give a file path (SQLite, not a file: URI), a postgres:// URL, or memory:")]
    /// The text is not a location: it says what was given.
    Invalid(String),
    #[error("cannot create the directory {path}: {source}")]
    /// The SQLite file's directory cannot be created.
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    #[error(transparent)]
    /// The store failed to open.
    Store(#[from] StoreError),
    /// The location names a backend this build left out.
    #[error("{location} needs factline built with the `{feature}` feature")]
    NotBuiltIn {
        /// The location, passwords hidden.
        location: String,
        /// The cargo feature that builds its backend in.
        feature: &'static str,
    },
}

impl Location {
    /// Parses a `--db` style location: a file path, a `postgres://` URL or `memory:`.
    pub fn parse(spec: &str) -> Result<Self, OpenError> {
        let lower = spec.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Ok(Location::Postgres(spec.to_string()));
        }
        if spec == "memory:" {
            return Ok(Location::Memory);
        }
        // `file:` URIs are SQLite's own syntax, which factline does not
        // pass through: taken as a path it would create odd files.
        if spec.trim().is_empty() || lower.contains("://") || lower.starts_with("file:") {
            return Err(OpenError::Invalid(spec.to_string()));
        }
        Ok(Location::Sqlite(PathBuf::from(spec)))
    }

    /// Opens the store, creating a SQLite file (and its directory) or the
    /// PostgreSQL schema if needed.
    pub async fn open(&self) -> Result<Arc<dyn EventStore>, OpenError> {
        match self {
            Location::Memory => Ok(Arc::new(InMemoryStore::new())),
            #[cfg(feature = "sqlite")]
            Location::Sqlite(path) => {
                create_parent(path)?;
                Ok(Arc::new(sqlite::SqliteStore::open(path)?))
            }
            #[cfg(feature = "postgres")]
            Location::Postgres(url) => Ok(Arc::new(postgres::PostgresStore::connect(url).await?)),
            #[allow(unreachable_patterns)]
            other => Err(OpenError::NotBuiltIn {
                location: other.describe(),
                feature: match other {
                    Location::Postgres(_) => "postgres",
                    _ => "sqlite",
                },
            }),
        }
    }

    /// The location for people to read: a PostgreSQL password is hidden.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(path) => path.display().to_string(),
            Location::Memory => "memory".to_string(),
            Location::Postgres(url) => redact_password(url),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &authority[..colon],
            &url[scheme_end + at..]
        ),
        _ => url.to_string(),
    }
}

#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
fn create_parent(path: &Path) -> Result<(), OpenError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => std::fs::create_dir_all(dir)
            .map_err(|source| OpenError::CreateDir {
                path: dir.to_path_buf(),
                source,
            }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            Location::parse("a/b.db").unwrap(),
            Location::Sqlite("a/b.db".into())
        );
        assert_eq!(Location::parse("memory:").unwrap(), Location::Memory);
        assert_eq!(
            Location::parse("postgres://x/y").unwrap(),
            Location::Postgres("postgres://x/y".into())
        );
        assert_eq!(
            Location::parse("PostgreSQL://x/y").unwrap(),
            Location::Postgres("PostgreSQL://x/y".into())
        );
        assert!(matches!(
            Location::parse("nats://x"),
            Err(OpenError::Invalid(_))
        ));
        assert!(matches!(Location::parse(""), Err(OpenError::Invalid(_))));
    }

    #[test]
    fn passwords_are_hidden_in_descriptions() {
        let show = |s: &str| Location::parse(s).unwrap().describe();
        assert_eq!(
            show("postgres://me:s3cr:t@db.example:5432/app?sslmode=disable"),
            "postgres://me:***@db.example:5432/app?sslmode=disable"
        );
        assert_eq!(show("postgres://me@db/app"), "postgres://me@db/app");
        assert_eq!(show("postgres://db:5432/app"), "postgres://db:5432/app");
        assert_eq!(show("a/b.db"), "a/b.db");
    }
}
