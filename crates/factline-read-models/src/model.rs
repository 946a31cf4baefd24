//! Read models as checked from a definitions file: every name resolved,
//! every expression parsed, ready to turn events into statements.

use crate::expr::{ColumnType, Cond, Expr, Val};

/// A read model from a definitions file.
#[derive(Clone, Debug)]
pub struct ReadModel {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) description: Option<String>,
    pub(crate) categories: Vec<String>,
    pub(crate) when: Option<Cond>,
    pub(crate) on_error: OnError,
    pub(crate) tables: Vec<Table>,
    pub(crate) lookups: Vec<Lookup>,
    /// Per event type, its operations in order.
    pub(crate) handlers: Vec<(String, Vec<Op>)>,
    pub(crate) queries: Vec<Query>,
    pub(crate) panels: Vec<Panel>,
    pub(crate) fingerprint: String,
}

impl ReadModel {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version of its definition.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// What it is for, if the file says.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The categories it reads; empty for all.
    pub fn categories(&self) -> &[String] {
        &self.categories
    }

    /// The event types it applies.
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.handlers.iter().map(|(t, _)| t.as_str())
    }

    /// Its tables.
    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// Its named queries.
    pub fn queries(&self) -> &[Query] {
        &self.queries
    }

    /// Its dashboard panels.
    pub fn panels(&self) -> &[Panel] {
        &self.panels
    }

    /// What happens to an event it cannot apply.
    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    /// A digest of everything that decides its tables' content (not its
    /// description or queries): two definitions with the same version must
    /// have the same fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub(crate) fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<&Lookup> {
        self.lookups.iter().find(|l| l.name == name)
    }
}

/// What a read model does with an event it cannot apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnError {
    /// Park it (listed by `projections parked`) and go on.
    Park,
    /// Stop the read model until someone skips or fixes the event.
    Stop,
}

/// A table of a read model.
#[derive(Clone, Debug)]
pub struct Table {
    pub(crate) name: String,
    pub(crate) columns: Vec<Column>,
    pub(crate) key: Vec<String>,
    pub(crate) indexes: Vec<Vec<String>>,
}

impl Table {
    /// Its logical name (the view readers query).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its columns, in order.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The columns of its primary key.
    pub fn key(&self) -> &[String] {
        &self.key
    }

    pub(crate) fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// A column of a table.
#[derive(Clone, Debug)]
pub struct Column {
    pub(crate) name: String,
    pub(crate) ty: ColumnType,
    pub(crate) nullable: bool,
    pub(crate) default: Option<Val>,
}

impl Column {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its type.
    pub fn column_type(&self) -> ColumnType {
        self.ty
    }

    /// Whether it may be null.
    pub fn nullable(&self) -> bool {
        self.nullable
    }
}

/// A value remembered in a table: `lookup.<name>`.
#[derive(Clone, Debug)]
pub(crate) struct Lookup {
    pub name: String,
    pub table: String,
    pub key: Vec<(String, ValueSpec)>,
    pub column: String,
}

/// A value with what to use when it is missing.
#[derive(Clone, Debug)]
pub(crate) struct ValueSpec {
    pub expr: Expr,
    pub default: Option<Val>,
}

/// The kind of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    Insert { ignore_existing: bool },
    Upsert,
    Update,
    Delete,
    Sql,
}

impl OpKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpKind::Insert { .. } => "insert",
            OpKind::Upsert => "upsert",
            OpKind::Update => "update",
            OpKind::Delete => "delete",
            OpKind::Sql => "sql",
        }
    }
}

/// How a column changes in an upsert or update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Change {
    Set,
    Add,
    Min,
    Max,
}

/// One operation of an event type.
#[derive(Clone, Debug)]
pub(crate) struct Op {
    pub kind: OpKind,
    /// The table it writes (none for raw SQL).
    pub table: Option<String>,
    pub when: Option<Cond>,
    /// A lookup that finds no row, or an update or delete that finds none,
    /// makes the operation do nothing instead of failing the event.
    pub skip_missing: bool,
    pub key: Vec<(String, ValueSpec)>,
    /// Insert's values, or the columns an upsert or update changes.
    pub changes: Vec<(String, Change, ValueSpec)>,
    /// Raw SQL with `:name` parameters and `{table}` tables.
    pub sql: Option<String>,
    pub params: Vec<(String, ValueSpec)>,
}

/// A dashboard panel: a named query drawn as a chart.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Panel {
    /// Its heading.
    pub title: String,
    /// The named query it draws.
    pub query: String,
    /// `number`, `table`, `bar`, `stacked_bars_per_day` or `line`.
    pub chart: String,
    /// The column of labels, days or times.
    pub x: Option<String>,
    /// The column of values.
    pub y: Option<String>,
    /// The column that splits values into series.
    pub series: Option<String>,
    /// The columns a table shows (all when empty).
    pub columns: Vec<String>,
    /// Columns holding cents.
    pub cents: Vec<String>,
    #[serde(skip)]
    pub(crate) params: Vec<(String, PanelParam)>,
}

/// A panel's query parameter.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum PanelParam {
    Const(String),
    DaysAgo(u32),
}

impl Panel {
    /// Its query's parameters now (a `days_ago` as that UTC day).
    pub fn params(&self, now: chrono::DateTime<chrono::Utc>) -> Vec<(String, String)> {
        self.params
            .iter()
            .map(|(name, p)| {
                let value = match p {
                    PanelParam::Const(v) => v.clone(),
                    PanelParam::DaysAgo(n) => (now - chrono::Duration::days(i64::from(*n)))
                        .format("%Y-%m-%d")
                        .to_string(),
                };
                (name.clone(), value)
            })
            .collect()
    }
}

/// A named read-only query of a read model.
#[derive(Clone, Debug)]
pub struct Query {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) sql: String,
    pub(crate) params: Vec<(String, ColumnType)>,
}

impl Query {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What it answers, if the file says.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// Its SQL as written: tables as `{table}`, parameters as `:name`.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// Its parameters and their types.
    pub fn params(&self) -> &[(String, ColumnType)] {
        &self.params
    }
}
