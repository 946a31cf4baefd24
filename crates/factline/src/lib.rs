//! factline: an event store and projection engine for event-sourced CQRS
//! systems. This facade re-exports the pieces an application embeds and
//! knows how to open a store from a `--db` style location.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use factline_core::*;
pub use factline_sqlite as sqlite;

/// Where the CLI keeps its data when neither `--db` nor `FACTLINE_DB` is set.
pub const DEFAULT_DB: &str = "./factline-data/factline.db";

/// A store location as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A file path: the embedded SQLite store.
    Sqlite(PathBuf),
    /// `memory:`: an in-memory store that lives as long as the process.
    Memory,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0:?} is not a supported database: PostgreSQL support has not been built yet; use a file path for SQLite")]
    Unsupported(String),
    #[error("{0:?} is not a database location: give a file path, or memory:")]
    Invalid(String),
    #[error("cannot create the directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Location {
    pub fn parse(spec: &str) -> Result<Self, OpenError> {
        let lower = spec.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Err(OpenError::Unsupported(spec.to_string()));
        }
        if spec == "memory:" {
            return Ok(Location::Memory);
        }
        if spec.trim().is_empty() || lower.contains("://") {
            return Err(OpenError::Invalid(spec.to_string()));
        }
        Ok(Location::Sqlite(PathBuf::from(spec)))
    }

    /// Opens the store, creating a SQLite file (and its directory) if needed.
    pub fn open(&self) -> Result<Arc<dyn EventStore>, OpenError> {
        match self {
            Location::Memory => Ok(Arc::new(InMemoryStore::new())),
            Location::Sqlite(path) => {
                create_parent(path)?;
                Ok(Arc::new(sqlite::SqliteStore::open(path)?))
            }
        }
    }
}

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
        assert!(matches!(
            Location::parse("postgres://x/y"),
            Err(OpenError::Unsupported(_))
        ));
        assert!(matches!(
            Location::parse("nats://x"),
            Err(OpenError::Invalid(_))
        ));
        assert!(matches!(Location::parse(""), Err(OpenError::Invalid(_))));
    }
}
