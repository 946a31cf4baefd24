//! [`Reader`]: the declared read models of one read-model database,
//! answered over their views with the position they had reached.

use std::sync::Arc;

use crate::query::{plan_query, plan_table, Answer, Plan, QueryError, TableRequest};
use crate::{Definitions, ReadModel};

/// Reads the declared read models of one database: tables, named
/// queries, and how far each has got. Every answer is read in one read
/// transaction with the read model's position, so it says exactly which
/// events its rows reflect.
pub struct Reader {
    definitions: Arc<Definitions>,
    backend: Backend,
}

enum Backend {
    #[cfg(feature = "sqlite")]
    Sqlite(crate::sqlite::SqliteReader),
    #[cfg(feature = "postgres")]
    Postgres(crate::postgres::PostgresReader),
}

impl Reader {
    /// The read models of `definitions` in the SQLite file at `path`
    /// (opened read-only).
    #[cfg(feature = "sqlite")]
    pub fn sqlite(path: &std::path::Path, definitions: Arc<Definitions>) -> Self {
        Reader {
            definitions,
            backend: Backend::Sqlite(crate::sqlite::SqliteReader::new(path)),
        }
    }

    /// The read models of `definitions` in the schema `schema` of the
    /// PostgreSQL database at `url` (read-only transactions).
    #[cfg(feature = "postgres")]
    pub fn postgres(
        url: &str,
        schema: &str,
        definitions: Arc<Definitions>,
    ) -> Result<Self, QueryError> {
        Ok(Reader {
            definitions,
            backend: Backend::Postgres(crate::postgres::PostgresReader::new(url, schema)?),
        })
    }

    /// The definitions it answers for.
    pub fn definitions(&self) -> &Definitions {
        &self.definitions
    }

    fn model(&self, name: &str) -> Result<&ReadModel, QueryError> {
        self.definitions.get(name).ok_or_else(|| {
            let names: Vec<&str> = self
                .definitions
                .read_models()
                .iter()
                .map(|m| m.name())
                .collect();
            QueryError::NotFound(format!(
                "no read model {name:?} is declared (declared: {})",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ))
        })
    }

    /// Rows of `table` of `read_model`.
    pub async fn table(
        &self,
        read_model: &str,
        table: &str,
        request: &TableRequest,
    ) -> Result<Answer, QueryError> {
        let plan = plan_table(self.model(read_model)?, table, request)?;
        self.run(plan).await
    }

    /// The rows of the named query `query` of `read_model`, with its
    /// parameters (and `limit`) as given.
    pub async fn query(
        &self,
        read_model: &str,
        query: &str,
        params: &[(String, String)],
    ) -> Result<Answer, QueryError> {
        let plan = plan_query(self.model(read_model)?, query, params)?;
        self.run(plan).await
    }

    /// Whether [`Reader::table`] would be answered (the names exist, the
    /// request fits), without reading.
    pub fn check_table(
        &self,
        read_model: &str,
        table: &str,
        request: &TableRequest,
    ) -> Result<(), QueryError> {
        plan_table(self.model(read_model)?, table, request).map(|_| ())
    }

    /// Whether [`Reader::query`] would be answered, without reading.
    pub fn check_query(
        &self,
        read_model: &str,
        query: &str,
        params: &[(String, String)],
    ) -> Result<(), QueryError> {
        plan_query(self.model(read_model)?, query, params).map(|_| ())
    }

    /// The position `read_model`'s active version has reached (0 before
    /// its first batch).
    pub async fn position(&self, read_model: &str) -> Result<u64, QueryError> {
        let name = self.model(read_model)?.name().to_owned();
        match &self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(r) => r.position(&name).await,
            #[cfg(feature = "postgres")]
            Backend::Postgres(r) => r.position(&name).await,
        }
    }

    async fn run(&self, plan: Plan) -> Result<Answer, QueryError> {
        match &self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(r) => r.run(plan).await,
            #[cfg(feature = "postgres")]
            Backend::Postgres(r) => r.run(plan).await,
        }
    }
}
