//! Declared read models: read models defined in a TOML file instead of
//! Rust, for teams whose services are written in any language. Each
//! `[[read_model]]` names its tables, the events it reads and, per event
//! type, operations (insert, upsert with set/add/min/max, update, delete,
//! raw SQL) whose values come from the event. The projection engine runs
//! them like read models written in Rust: checkpoint in the batch's
//! transaction, blue/green rebuilds by version, parking, partitions,
//! leases. The file format is documented in `docs/read-models.md`.
//!
//! ```
//! use factline_read_models::Definitions;
//!
//! let file = r#"
//! [[read_model]]
//! name = "paid_invoices"
//! version = 1
//! categories = ["Invoice"]
//!
//! [read_model.tables.paid]
//! columns = { invoice = "text", cents = "integer" }
//! key = ["invoice"]
//!
//! [[read_model.on.InvoicePaid]]
//! upsert = "paid"
//! key = { invoice = "entity_id" }
//! add = { cents = "data.cents" }
//! "#;
//! let definitions = Definitions::parse(file, "invoices.toml").unwrap();
//! assert_eq!(definitions.read_models()[0].name(), "paid_invoices");
//!
//! // Mistakes are reported with their line and column.
//! let wrong = file.replace("add = { cents", "add = { amount");
//! let errors = Definitions::parse(&wrong, "invoices.toml").unwrap_err();
//! assert!(
//!     errors.to_string().starts_with("invoices.toml:14:18: \"amount\" is not a column of paid"),
//!     "{errors}"
//! );
//! ```

#![warn(missing_docs)]
// Without a database there is nothing to run a query plan on.
#![cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]

use std::path::Path;
use std::sync::Arc;

mod batch;
mod cache;
mod check;
mod data;
mod expr;
mod file;
mod model;
#[cfg(feature = "postgres")]
mod postgres;
mod projection;
mod query;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod reader;
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;

pub use expr::ColumnType;
pub use model::{Column, OnError, Panel, Query, ReadModel, Table};
pub use projection::DeclaredProjection;
pub use query::{Answer, QueryError, TableRequest, DEFAULT_ROWS, MAX_ROWS, RESERVED_PARAMS};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use reader::Reader;

/// The read models of one definitions file.
#[derive(Clone, Debug, Default)]
pub struct Definitions {
    read_models: Vec<ReadModel>,
}

impl Definitions {
    /// Checks the TOML text of a definitions file; `origin` (its path)
    /// starts each error's place.
    pub fn parse(text: &str, origin: &str) -> Result<Self, DefinitionErrors> {
        check::check(text, origin)
    }

    /// Reads and checks a definitions file.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::parse(&text, &path.display().to_string())?)
    }

    /// Read models checked elsewhere (several files' together); their
    /// names must differ.
    pub fn from_read_models(read_models: Vec<ReadModel>) -> Self {
        Definitions { read_models }
    }

    /// The read models, in the file's order.
    pub fn read_models(&self) -> &[ReadModel] {
        &self.read_models
    }

    /// The read model called `name`.
    pub fn get(&self, name: &str) -> Option<&ReadModel> {
        self.read_models.iter().find(|m| m.name() == name)
    }

    /// The projection that runs the read model called `name`.
    pub fn projection(&self, name: &str) -> Option<DeclaredProjection> {
        self.get(name)
            .map(|m| DeclaredProjection::new(Arc::new(m.clone())))
    }
}

/// The JSON Schema of definitions files, for editors that complete them.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(file::FileDef)).unwrap_or_default()
}

/// One mistake in a definitions file, with its place.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}:{column}: {message}")]
pub struct DefinitionError {
    /// The file (as named to [`Definitions::parse`]).
    pub origin: String,
    /// Its line, from 1.
    pub line: usize,
    /// Its column, from 1, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// Every mistake found in a definitions file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionErrors(pub Vec<DefinitionError>);

impl std::fmt::Display for DefinitionErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Why a definitions file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file has mistakes.
    #[error(transparent)]
    Invalid(#[from] DefinitionErrors),
}
