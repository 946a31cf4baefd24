//! Reading declared read models: a table with equality filters, an order
//! and a cursor, or a named query with typed parameters. Planned here for
//! both databases; `sqlite.rs` and `postgres.rs` run a plan in one read
//! transaction together with the position the read model has reached.

use factline_core::StorageError;
use factline_projections::SqlValue;
use serde_json::{Map, Value};

use crate::expr::ColumnType;
use crate::model::{ReadModel, Table};
use crate::sql::{ident, scan, Piece};

/// The most rows one answer holds.
pub const MAX_ROWS: usize = 1000;

/// Rows when a request does not say `limit`.
pub const DEFAULT_ROWS: usize = 100;

/// Query parameters with a meaning of their own; every other parameter of
/// a table request is an equality filter on a column.
pub const RESERVED_PARAMS: &[&str] = &["order", "limit", "cursor", "min_position", "timeout_ms"];

/// What a table request asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableRequest {
    /// Column = value, every one must hold.
    pub filters: Vec<(String, String)>,
    /// The column rows are sorted by (`-column`: descending); the key
    /// when absent.
    pub order: Option<String>,
    /// At most this many rows ([`DEFAULT_ROWS`] when absent, at most
    /// [`MAX_ROWS`]).
    pub limit: Option<usize>,
    /// Where the previous answer ended.
    pub cursor: Option<String>,
}

impl TableRequest {
    /// A request from query parameters: `order`, `limit`, `cursor`, and
    /// filters (the parameters in [`RESERVED_PARAMS`] other than these are
    /// left out).
    pub fn from_params(params: &[(String, String)]) -> Result<Self, QueryError> {
        let mut request = TableRequest::default();
        for (name, value) in params {
            match name.as_str() {
                "order" => request.order = Some(value.clone()),
                "limit" => request.limit = Some(parse_limit(value)?),
                "cursor" => request.cursor = Some(value.clone()),
                "min_position" | "timeout_ms" => {}
                _ => request.filters.push((name.clone(), value.clone())),
            }
        }
        Ok(request)
    }
}

fn parse_limit(value: &str) -> Result<usize, QueryError> {
    match value.parse::<usize>() {
        Ok(n) if (1..=MAX_ROWS).contains(&n) => Ok(n),
        _ => Err(QueryError::Invalid(format!(
            "limit must be a whole number from 1 to {MAX_ROWS}, not {value:?}"
        ))),
    }
}

/// An answer: rows as JSON objects, the position the read model had
/// reached when they were read, and the cursor of the next page.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Answer {
    /// Each row, column name to value.
    pub rows: Vec<Map<String, Value>>,
    /// The global position of the last event the rows reflect (0 before
    /// the read model's first batch).
    pub position: u64,
    /// Pass as `cursor` for the rows after these; `None` on the last page.
    pub next: Option<String>,
}

/// Why a read-model request has no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// No read model, table or query by that name.
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit: an unknown column, a value of the wrong
    /// type, a bad limit or cursor, a missing parameter.
    #[error("{0}")]
    Invalid(String),
    /// The read model's database failed.
    #[error("{0}")]
    Storage(#[from] StorageError),
}

/// A statement ready for one database: `{select}` is what each row
/// yields (`q.*`, or PostgreSQL's `row_to_json(q)::text`), `{view:t}` the
/// view of table `t`.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub read_model: String,
    pub sql: String,
    pub params: Vec<SqlValue>,
    pub limit: usize,
    pub paging: Paging,
}

/// How the next page's cursor is made from the last row.
#[derive(Clone, Debug)]
pub(crate) enum Paging {
    /// One page only (a named query).
    None,
    /// After the values of these columns.
    After(Vec<String>),
    /// After this many rows (a table without a key).
    Offset(usize),
}

impl Plan {
    /// The SQL with views named for one database (`prefix`: `""` or
    /// `"schema".`) and rows shaped by `select`.
    pub fn sql_for(&self, prefix: &str, select: &str) -> String {
        let mut sql = self.sql.replace("{select}", select);
        while let Some(at) = sql.find("{view:") {
            let end = at + sql[at..].find('}').unwrap_or(0);
            let table = sql[at + 6..end].to_owned();
            sql.replace_range(at..=end, &format!("{prefix}{table}"));
        }
        sql
    }

    /// The answer from the rows read (one more than the limit when there
    /// are more).
    pub fn answer(&self, mut rows: Vec<Map<String, Value>>, position: u64) -> Answer {
        let more = rows.len() > self.limit;
        rows.truncate(self.limit);
        let next = match (&self.paging, more) {
            (_, false) | (Paging::None, _) => None,
            (Paging::Offset(skipped), true) => Some(encode(&Value::from(skipped + self.limit))),
            (Paging::After(columns), true) => rows.last().map(|row| {
                encode(&Value::Array(
                    columns
                        .iter()
                        .map(|c| row.get(c).cloned().unwrap_or(Value::Null))
                        .collect(),
                ))
            }),
        };
        Answer {
            rows,
            position,
            next,
        }
    }
}

/// A cursor is opaque to clients: hex of a small JSON value.
fn encode(value: &Value) -> String {
    value
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode(cursor: &str) -> Option<Value> {
    if cursor.len() % 2 != 0 || cursor.len() > 8192 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
        .collect();
    serde_json::from_slice(&bytes?).ok()
}

/// `text` as a value of a column of type `ty`.
fn typed(text: &str, ty: ColumnType, what: &str) -> Result<SqlValue, QueryError> {
    let wrong = |kind: &str| QueryError::Invalid(format!("{what} is {kind}; {text:?} is not one"));
    Ok(match ty {
        ColumnType::Text => SqlValue::Text(text.to_owned()),
        ColumnType::Integer => SqlValue::Int(text.parse().map_err(|_| wrong("an integer"))?),
        ColumnType::Real => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => SqlValue::Real(f),
            _ => return Err(wrong("a number")),
        },
    })
}

/// A cursor value as a value of a column of type `ty`.
fn from_json(value: &Value, ty: ColumnType) -> Option<SqlValue> {
    match (ty, value) {
        (ColumnType::Text, Value::String(s)) => Some(SqlValue::Text(s.clone())),
        (ColumnType::Integer, Value::Number(n)) => n.as_i64().map(SqlValue::Int),
        (ColumnType::Real, Value::Number(n)) => n.as_f64().map(SqlValue::Real),
        _ => None,
    }
}

fn param(params: &mut Vec<SqlValue>, value: SqlValue, ty: ColumnType) -> String {
    params.push(value);
    format!("CAST(${} AS {})", params.len(), ty.sql())
}

fn find_table<'a>(model: &'a ReadModel, table: &str) -> Result<&'a Table, QueryError> {
    model.table(table).ok_or_else(|| {
        let tables: Vec<&str> = model.tables.iter().map(|t| t.name.as_str()).collect();
        QueryError::NotFound(format!(
            "read model {} has no table {table:?} (it has {})",
            model.name,
            tables.join(", ")
        ))
    })
}

/// Plans a table request.
pub(crate) fn plan_table(
    model: &ReadModel,
    table: &str,
    request: &TableRequest,
) -> Result<Plan, QueryError> {
    let table = find_table(model, table)?;
    let column = |name: &str| {
        table.column(name).ok_or_else(|| {
            QueryError::Invalid(format!(
                "{name:?} is not a column of {} (its columns: {}; other parameters: {})",
                table.name,
                table
                    .columns
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                RESERVED_PARAMS.join(", ")
            ))
        })
    };
    let mut params = Vec::new();
    let mut conditions = Vec::new();
    for (name, value) in &request.filters {
        let col = column(name)?;
        let p = param(
            &mut params,
            typed(value, col.ty, &format!("{}.{name}", table.name))?,
            col.ty,
        );
        conditions.push(format!("{} = {p}", ident(name)));
    }
    let (order, descending) = match request.order.as_deref() {
        Some(o) => match o.strip_prefix('-') {
            Some(o) => (Some(o), true),
            None => (Some(o), false),
        },
        None => (None, false),
    };
    let mut sort: Vec<String> = Vec::new();
    if let Some(order) = order {
        let col = column(order)?;
        if col.nullable && !table.key.is_empty() {
            return Err(QueryError::Invalid(format!(
                "order: {}.{order} may be null; rows are ordered by columns that are never null",
                table.name
            )));
        }
        sort.push(order.to_owned());
    }
    for key in &table.key {
        if !sort.contains(key) {
            sort.push(key.clone());
        }
    }
    let limit = request.limit.unwrap_or(DEFAULT_ROWS).min(MAX_ROWS);
    let mut offset = 0;
    let paging = if table.key.is_empty() {
        if let Some(cursor) = &request.cursor {
            offset = decode(cursor)
                .and_then(|v| v.as_u64())
                .ok_or_else(|| QueryError::Invalid("cursor: not one this table gave".into()))?
                as usize;
        }
        Paging::Offset(offset)
    } else {
        if let Some(cursor) = &request.cursor {
            let values = decode(cursor)
                .and_then(|v| v.as_array().cloned())
                .filter(|v| v.len() == sort.len())
                .ok_or_else(|| {
                    QueryError::Invalid("cursor: not one this table and order gave".into())
                })?;
            let mut after = Vec::new();
            for (name, value) in sort.iter().zip(&values) {
                let ty = column(name)?.ty;
                let v = from_json(value, ty).ok_or_else(|| {
                    QueryError::Invalid("cursor: not one this table and order gave".into())
                })?;
                after.push(param(&mut params, v, ty));
            }
            let columns: Vec<String> = sort.iter().map(|c| format!("q.{}", ident(c))).collect();
            conditions.push(format!(
                "({}) {} ({})",
                columns.join(", "),
                if descending { "<" } else { ">" },
                after.join(", ")
            ));
        }
        Paging::After(sort.clone())
    };
    let direction = if descending { " DESC" } else { "" };
    let order_by: Vec<String> = if sort.is_empty() {
        // No key: a stable order for offsets, all columns.
        table
            .columns
            .iter()
            .map(|c| format!("q.{}", ident(&c.name)))
            .collect()
    } else {
        sort.iter()
            .map(|c| format!("q.{}{direction}", ident(c)))
            .collect()
    };
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {{select}} FROM {{view:{}}} AS q{filter} ORDER BY {} LIMIT {} OFFSET {offset}",
        table.name,
        order_by.join(", "),
        limit + 1
    );
    Ok(Plan {
        read_model: model.name.clone(),
        sql,
        params,
        limit,
        paging,
    })
}

/// Plans a named query with its parameters (`limit` caps its rows).
pub(crate) fn plan_query(
    model: &ReadModel,
    query: &str,
    given: &[(String, String)],
) -> Result<Plan, QueryError> {
    let q = model
        .queries
        .iter()
        .find(|q| q.name == query)
        .ok_or_else(|| {
            let names: Vec<&str> = model.queries.iter().map(|q| q.name.as_str()).collect();
            QueryError::NotFound(format!(
                "read model {} has no query {query:?} (it has: {})",
                model.name,
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ))
        })?;
    let mut limit = MAX_ROWS;
    for (name, value) in given {
        match name.as_str() {
            "limit" => limit = parse_limit(value)?,
            "min_position" | "timeout_ms" => {}
            _ if q.params.iter().any(|(p, _)| p == name) => {}
            _ => {
                let declared: Vec<&str> = q.params.iter().map(|(p, _)| p.as_str()).collect();
                return Err(QueryError::Invalid(format!(
                    "query {query} has no parameter {name:?} (it takes: {})",
                    if declared.is_empty() {
                        "none".to_owned()
                    } else {
                        declared.join(", ")
                    }
                )));
            }
        }
    }
    let mut values = Vec::new();
    for (name, ty) in &q.params {
        let text = given
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| {
                QueryError::Invalid(format!("query {query} needs the parameter {name}"))
            })?;
        values.push((
            name.as_str(),
            typed(text, *ty, &format!("parameter {name}"))?,
            *ty,
        ));
    }
    let mut params = Vec::new();
    let mut numbered: Vec<&str> = Vec::new();
    let mut sql = String::new();
    for (_, piece) in scan(&q.sql) {
        match piece {
            Piece::Text(t) => sql.push_str(t),
            Piece::Table(t) => sql.push_str(&format!("{{view:{t}}}")),
            Piece::Param(p) => {
                let n = match numbered.iter().position(|q| *q == p) {
                    Some(n) => n + 1,
                    None => {
                        let (_, value, _) =
                            values.iter().find(|(n, _, _)| *n == p).ok_or_else(|| {
                                QueryError::Invalid(format!(
                                    "query {query}: parameter :{p} is not declared"
                                ))
                            })?;
                        params.push(value.clone());
                        numbered.push(p);
                        numbered.len()
                    }
                };
                let ty = values
                    .iter()
                    .find(|(n, _, _)| *n == p)
                    .map_or(ColumnType::Text, |v| v.2);
                sql.push_str(&format!("CAST(${n} AS {})", ty.sql()));
            }
        }
    }
    let inner = sql.trim().trim_end_matches(';');
    Ok(Plan {
        read_model: model.name.clone(),
        sql: format!("SELECT {{select}} FROM ({inner}) AS q LIMIT {}", limit + 1),
        params,
        limit,
        paging: Paging::None,
    })
}
