//! Diff reports (P4): what a rebuilt version would change for readers,
//! table by table, before it is swapped in.

use serde_json::Value;

/// How version N+1 of a projection differs from the active version N.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DiffReport {
    /// The active version (`None` when nothing is active yet).
    pub active: Option<u32>,
    /// The version compared with the active one.
    pub candidate: u32,
    /// One entry per logical table.
    pub tables: Vec<TableDiff>,
}

impl DiffReport {
    /// No row added, removed or changed anywhere.
    pub fn is_empty(&self) -> bool {
        self.tables
            .iter()
            .all(|t| t.added + t.removed + t.changed == 0)
    }
}

/// One logical table's differences. Rows are matched by the table's
/// primary key (by the whole row when it has none, so then a change shows
/// as one row removed and one added).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TableDiff {
    /// The logical table name.
    pub table: String,
    /// Rows only the candidate has.
    pub added: u64,
    /// Rows only the active version has.
    pub removed: u64,
    /// Rows both have, with other values.
    pub changed: u64,
    /// Up to the requested number of rows of each kind, as JSON objects.
    pub added_samples: Vec<Value>,
    /// Rows only the active version has, up to the requested number.
    pub removed_samples: Vec<Value>,
    /// (before, after) pairs.
    pub changed_samples: Vec<(Value, Value)>,
}

/// The SQL of the three comparisons, for one dialect.
pub(crate) struct DiffSql {
    pub added_count: String,
    pub added_rows: String,
    pub removed_count: String,
    pub removed_rows: String,
    pub changed_count: String,
    pub changed_rows: String,
}

/// How a dialect spells what the comparisons need.
pub(crate) struct Dialect {
    /// Null-safe equality of two expressions.
    pub same: fn(&str, &str) -> String,
    /// A row of `alias` (with `columns`) as JSON text.
    pub row_json: fn(&str, &[String]) -> String,
}

/// The two physical tables of one logical table, and their columns.
pub(crate) struct Pair<'a> {
    pub old: &'a str,
    pub new: &'a str,
    /// The new table's primary key (empty: none).
    pub key: Vec<String>,
    pub old_columns: Vec<String>,
    pub new_columns: Vec<String>,
}

/// Builds the comparisons of a pair, matching rows on the key and
/// comparing the columns both versions have.
pub(crate) fn diff_sql(dialect: &Dialect, pair: &Pair<'_>, samples: usize) -> DiffSql {
    let (old, new) = (pair.old, pair.new);
    let (old_columns, new_columns) = (&pair.old_columns, &pair.new_columns);
    let columns: Vec<String> = new_columns
        .iter()
        .filter(|c| old_columns.contains(c))
        .cloned()
        .collect();
    let key: Vec<String> = pair
        .key
        .iter()
        .filter(|c| old_columns.contains(c))
        .cloned()
        .collect();
    let key = if key.len() == pair.key.len() {
        key
    } else {
        Vec::new()
    };
    let match_on: Vec<&String> = if key.is_empty() {
        columns.iter().collect()
    } else {
        key.iter().collect()
    };
    let joined = |a: &str, b: &str| {
        match_on
            .iter()
            .map(|c| (dialect.same)(&format!("{a}.{c}"), &format!("{b}.{c}")))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let missing_in = |outer: &str, outer_alias: &str, inner: &str| {
        format!(
            "FROM {outer} {outer_alias} WHERE NOT EXISTS (SELECT 1 FROM {inner} i WHERE {})",
            joined("i", outer_alias)
        )
    };
    let differs = columns
        .iter()
        .map(|c| (dialect.same)(&format!("n.{c}"), &format!("o.{c}")))
        .collect::<Vec<_>>()
        .join(" AND ");
    let changed_from = if key.is_empty() || columns.is_empty() {
        // Without a key a changed row is a removed one and an added one.
        format!("FROM {new} n JOIN {old} o ON 1 = 0")
    } else {
        format!(
            "FROM {new} n JOIN {old} o ON {} WHERE NOT ({differs})",
            joined("o", "n")
        )
    };
    let added = missing_in(new, "n", old);
    let removed = missing_in(old, "o", new);
    DiffSql {
        added_count: format!("SELECT count(*) {added}"),
        added_rows: format!(
            "SELECT {} {added} LIMIT {samples}",
            (dialect.row_json)("n", new_columns)
        ),
        removed_count: format!("SELECT count(*) {removed}"),
        removed_rows: format!(
            "SELECT {} {removed} LIMIT {samples}",
            (dialect.row_json)("o", old_columns)
        ),
        changed_count: format!("SELECT count(*) {changed_from}"),
        changed_rows: format!(
            "SELECT {}, {} {changed_from} LIMIT {samples}",
            (dialect.row_json)("o", old_columns),
            (dialect.row_json)("n", new_columns)
        ),
    }
}

/// Parses a row rendered as JSON text by the database.
pub(crate) fn row_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// Counts and samples one side's rows: a table only one version has.
pub(crate) fn whole_table_sql(
    dialect: &Dialect,
    table: &str,
    columns: &[String],
    samples: usize,
) -> (String, String) {
    (
        format!("SELECT count(*) FROM {table}"),
        format!(
            "SELECT {} FROM {table} t LIMIT {samples}",
            (dialect.row_json)("t", columns)
        ),
    )
}
