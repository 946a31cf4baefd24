//! The definitions file as written: TOML, read with the position of every
//! value kept (`Spanned`) so that an error can name its line and column.
//! [`crate::check`] turns it into [`crate::ReadModel`]s. The JSON Schema
//! printed by `factline read-models schema` is derived from these types.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use toml::Spanned;

/// A definitions file: any number of `[[read_model]]` sections.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "factline read models")]
pub(crate) struct FileDef {
    /// The read models, one `[[read_model]]` section each.
    #[serde(default, rename = "read_model")]
    pub read_models: Vec<ReadModelDef>,
}

/// One read model.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadModelDef {
    /// 1 to 100 letters, digits, `_`, `-` or `.`; unique in the file.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Raise it whenever the definition changes: the new version is rebuilt
    /// beside the active one and swapped in when it has caught up.
    #[schemars(with = "u32", range(min = 1))]
    pub version: Spanned<i64>,
    /// What it is for (shown by `projections list`).
    #[serde(default)]
    pub description: Option<String>,
    /// The categories of the streams it reads (the part of a stream id
    /// before its first `-`); all categories when absent.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub categories: Vec<Spanned<String>>,
    /// A condition every event must meet to be applied, e.g.
    /// `"metadata.tenant == 'acme'"`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub when: Option<Spanned<String>>,
    /// What happens to an event the definition cannot apply: `park` (the
    /// default) sets it aside and goes on; `stop` stops the read model.
    #[serde(default)]
    pub on_error: Option<OnErrorDef>,
    /// Its tables, by name.
    #[schemars(with = "IndexMap<String, TableDef>")]
    pub tables: IndexMap<String, Spanned<TableDef>>,
    /// Values remembered in its own tables, by name, usable as
    /// `lookup.<name>` in the operations.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, LookupDef>")]
    pub lookups: IndexMap<String, Spanned<LookupDef>>,
    /// What to do per event type: the operations, in order.
    #[schemars(with = "IndexMap<String, Vec<OpDef>>")]
    pub on: IndexMap<String, Vec<Spanned<OpDef>>>,
    /// Named read-only queries, served at
    /// `/read-models/{name}/queries/{query}`.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, QueryDef>")]
    pub queries: IndexMap<String, Spanned<QueryDef>>,
    /// Panels on the dashboard, each a chart of one of its queries.
    #[serde(default)]
    #[schemars(with = "Vec<PanelDef>")]
    pub panels: Vec<Spanned<PanelDef>>,
}

/// A dashboard panel: a named query drawn as a chart.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PanelDef {
    /// Its heading.
    pub title: String,
    /// The named query whose rows it draws.
    pub query: String,
    /// `number` (the first row's `y`), `table` (`columns`), `bar` (`y`
    /// per `x`), `stacked_bars_per_day` (`y` per day `x`, stacked by
    /// `series`) or `line` (`y` over `x`, one line per `series`).
    pub chart: String,
    /// The column of labels, days or times.
    pub x: Option<String>,
    /// The column of values.
    pub y: Option<String>,
    /// The column that splits values into series.
    pub series: Option<String>,
    /// The columns a table shows, in order (all by default).
    #[serde(default)]
    pub columns: Vec<String>,
    /// Columns holding cents, shown as amounts with two decimals.
    #[serde(default)]
    pub cents: Vec<String>,
    /// The query's parameters: a constant, or `{ days_ago = N }` for the
    /// UTC day N days before today (`YYYY-MM-DD`).
    #[serde(default)]
    #[schemars(with = "IndexMap<String, serde_json::Value>")]
    pub params: IndexMap<String, toml::Value>,
}

/// See [`ReadModelDef::on_error`].
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OnErrorDef {
    Park,
    Stop,
}

/// A table of the read model.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TableDef {
    /// Its columns in order: `name = "text"` (or `integer`, `real`), or
    /// `name = { type = "integer", nullable = true, default = 0 }`.
    #[schemars(with = "IndexMap<String, ColumnDef>")]
    pub columns: IndexMap<String, Spanned<ColumnDef>>,
    /// The columns of its primary key.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub key: Vec<Spanned<String>>,
    /// Indexes, each a list of columns.
    #[serde(default)]
    #[schemars(with = "Vec<Vec<String>>")]
    pub indexes: Vec<Spanned<Vec<String>>>,
}

/// A column: its type, or its type with options.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub(crate) enum ColumnDef {
    /// `"text"`, `"integer"` or `"real"`: a column that is never null.
    Type(String),
    /// The type with options.
    Full {
        /// `"text"`, `"integer"` or `"real"`.
        #[serde(rename = "type")]
        ty: String,
        /// Whether it may be null (false by default).
        #[serde(default)]
        nullable: bool,
        /// The value of a new row that does not set it.
        #[serde(default)]
        #[schemars(with = "Option<serde_json::Value>")]
        default: Option<toml::Value>,
    },
}

/// A value remembered in a table of the read model (`lookup.<name>`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LookupDef {
    /// The table it is read from.
    pub table: String,
    /// Equality on columns that finds one row: column = value.
    #[schemars(with = "IndexMap<String, ValueDef>")]
    pub key: IndexMap<String, Spanned<ValueDef>>,
    /// The column whose value it is.
    pub column: String,
}

/// One operation of an event type: exactly one of `insert`, `upsert`,
/// `update`, `delete` or `sql`, naming its table (or giving its SQL).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct OpDef {
    /// Inserts a row into this table (`values`).
    pub insert: Option<String>,
    /// Inserts or changes the row of `key` in this table (`set`, `add`,
    /// `min`, `max`).
    pub upsert: Option<String>,
    /// Changes the rows of `key` in this table.
    pub update: Option<String>,
    /// Deletes the rows of `key` from this table.
    pub delete: Option<String>,
    /// Raw SQL, the escape hatch: tables as `{table}`, parameters as
    /// `:name` (from `params`).
    pub sql: Option<String>,
    /// The row: column = value (upsert, update, delete).
    #[serde(default)]
    #[schemars(with = "IndexMap<String, ValueDef>")]
    pub key: IndexMap<String, Spanned<ValueDef>>,
    /// The new row's columns (insert).
    #[serde(default)]
    #[schemars(with = "IndexMap<String, ValueDef>")]
    pub values: IndexMap<String, Spanned<ValueDef>>,
    /// Columns set to a value.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, ValueDef>")]
    pub set: IndexMap<String, Spanned<ValueDef>>,
    /// Columns a value is added to (a new row starts from the value).
    #[serde(default)]
    #[schemars(with = "IndexMap<String, ValueDef>")]
    pub add: IndexMap<String, Spanned<ValueDef>>,
    /// Columns that keep the smaller of theirs and the value.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, ValueDef>")]
    pub min: IndexMap<String, Spanned<ValueDef>>,
    /// Columns that keep the larger of theirs and the value.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, ValueDef>")]
    pub max: IndexMap<String, Spanned<ValueDef>>,
    /// The parameters of `sql`: name = value.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, ValueDef>")]
    pub params: IndexMap<String, Spanned<ValueDef>>,
    /// Insert: what a row whose key exists already does: `error` (the
    /// default: the event cannot be applied) or `ignore`.
    pub if_exists: Option<IfExistsDef>,
    /// What happens when a lookup finds no row, or an update or delete no
    /// row: `error` (the default: the event cannot be applied) or `skip`
    /// (this operation does nothing).
    pub if_missing: Option<IfMissingDef>,
    /// A condition the event must meet for this operation to run.
    #[schemars(with = "Option<String>")]
    pub when: Option<Spanned<String>>,
}

/// See [`OpDef::if_exists`].
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum IfExistsDef {
    Error,
    Ignore,
}

/// See [`OpDef::if_missing`].
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum IfMissingDef {
    Error,
    Skip,
}

/// A value: an expression (`"data.amount"`, `"entity_id"`,
/// `"recorded_day"`, `"lookup.region"`, `"'text'"`, `"len(data.lines)"`), a
/// number or a boolean, or `{ from = "data.amount", default = 0 }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub(crate) enum ValueDef {
    /// An expression.
    Expr(String),
    /// A whole number.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// `true` or `false` (stored as 1 or 0).
    Bool(bool),
    /// An expression with the value to use when it is missing or null.
    Full {
        /// The expression.
        from: String,
        /// Used when the expression is missing or null.
        #[schemars(with = "Option<serde_json::Value>")]
        default: Option<toml::Value>,
    },
}

/// A named read-only query.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueryDef {
    /// What it answers.
    #[serde(default)]
    pub description: Option<String>,
    /// One `SELECT` (or `WITH … SELECT`): tables as `{table}`, parameters
    /// as `:name`.
    #[schemars(with = "String")]
    pub sql: Spanned<String>,
    /// Its parameters: name = type (`text`, `integer`, `real`).
    #[serde(default)]
    pub params: IndexMap<String, String>,
}
