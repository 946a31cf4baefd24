//! The SQL of one group of rows: the checks that lookups (and rows to
//! update or delete) exist, then the operation on every row at once, with
//! the rows as one JSON array parameter.

use super::*;

/// The statements of one group: checks that lookups (and rows to update
/// or delete) exist, then the operation on every row at once.
pub(super) fn group_statements(
    t: &Template,
    dialect: Dialect,
    tables: &Tables,
    rows: &[Vec<SqlValue>],
) -> Vec<Statement> {
    let elements = match dialect {
        Dialect::Sqlite => "json_each($1) AS e",
        _ => "json_array_elements($1::text::json) AS e(value)",
    };
    let named = |sql: String| {
        let mut sql = sql;
        while let Some(at) = sql.find("{table:") {
            let end = at + sql[at..].find('}').unwrap_or(0);
            let table = sql[at + 7..end].to_owned();
            sql.replace_range(at..=end, &tables.get(&table));
        }
        sql
    };
    let json = rows_json(rows);
    let statement = |sql: String| Statement::new(named(sql), vec![SqlValue::Text(json.clone())]);
    let all_of = |guards: &[String]| {
        if guards.is_empty() {
            "true".to_owned()
        } else {
            guards.join(" AND ")
        }
    };
    let guard = all_of(&t.guards);
    // The rows the operation applies: those whose lookups find a row.
    let rows_from = format!("{elements}{} WHERE {}", t.joins, all_of(&t.row_guards));
    let table = tables.get(&t.table);
    let mut out = Vec::new();
    for (lookup, exists) in &t.checked {
        out.push(
            statement(format!(
                "SELECT 1 FROM {elements} WHERE {guard} AND NOT ({exists}) LIMIT 1"
            ))
            .requiring(
                Expected::None,
                format!("lookup.{lookup} found no row for an event of this batch"),
            ),
        );
    }
    let key_columns: Vec<String> = t.key.iter().map(|(c, _)| ident(c)).collect();
    // A target row `cur` against a source row `u` of `k0…` keys.
    let same_key = key_columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("cur.{c} = u.k{i}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    // Fails the batch when a source row's target row is missing.
    let missing_row = |source: &str, what: &str| {
        statement(format!(
            "SELECT 1 FROM ({source}) AS u WHERE NOT EXISTS (SELECT 1 FROM {table} AS cur WHERE {same_key}) LIMIT 1"
        ))
        .requiring(
            Expected::None,
            format!("{what} {} found no row for an event of this batch", t.table),
        )
    };
    let key_values: Vec<&str> = t.key.iter().map(|(_, v)| v.as_str()).collect();
    match t.kind {
        OpKind::Insert { ignore_existing } => {
            let columns: Vec<String> = t.changes.iter().map(|(c, _, _)| ident(c)).collect();
            let values: Vec<&str> = t.changes.iter().map(|(_, _, v)| v.as_str()).collect();
            let conflict = if ignore_existing {
                " ON CONFLICT DO NOTHING"
            } else {
                ""
            };
            out.push(statement(format!(
                "INSERT INTO {table} ({}) SELECT {} FROM {rows_from}{conflict}",
                columns.join(", "),
                values.join(", ")
            )));
        }
        OpKind::Upsert => {
            let mut columns = key_columns.clone();
            columns.extend(t.changes.iter().map(|(c, _, _)| ident(c)));
            let updates: Vec<String> = t
                .changes
                .iter()
                .map(|(c, change, _)| {
                    format!(
                        "{} = {}",
                        ident(c),
                        combine(
                            *change,
                            &format!("cur.{}", ident(c)),
                            &format!("excluded.{}", ident(c))
                        )
                    )
                })
                .collect();
            let on_conflict = if updates.is_empty() {
                "DO NOTHING".to_owned()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            let select = if t.key_slots.is_some() {
                let mut values: Vec<&str> = key_values.clone();
                values.extend(t.changes.iter().map(|(_, _, v)| v.as_str()));
                format!("SELECT {} FROM {rows_from}", values.join(", "))
            } else {
                grouped(t, &rows_from)
            };
            out.push(statement(format!(
                "INSERT INTO {table} AS cur ({}) {select} ON CONFLICT ({}) {on_conflict}",
                columns.join(", "),
                key_columns.join(", ")
            )));
        }
        OpKind::Update => {
            let source = if t.key_slots.is_some() {
                let mut named_values: Vec<String> = t
                    .key
                    .iter()
                    .enumerate()
                    .map(|(i, (_, v))| format!("{v} AS k{i}"))
                    .collect();
                named_values.extend(
                    t.changes
                        .iter()
                        .enumerate()
                        .map(|(i, (_, _, v))| format!("{v} AS c{i}")),
                );
                format!("SELECT {} FROM {rows_from}", named_values.join(", "))
            } else {
                grouped(t, &rows_from)
            };
            if t.must_find {
                out.push(missing_row(&source, "update of"));
            }
            let sets: Vec<String> = t
                .changes
                .iter()
                .enumerate()
                .map(|(i, (c, change, _))| {
                    format!(
                        "{} = {}",
                        ident(c),
                        combine(*change, &format!("cur.{}", ident(c)), &format!("u.c{i}"))
                    )
                })
                .collect();
            out.push(statement(format!(
                "UPDATE {table} AS cur SET {} FROM ({source}) AS u WHERE {same_key}",
                sets.join(", "),
            )));
        }
        OpKind::Delete => {
            let keys = format!("SELECT {} FROM {rows_from}", key_values.join(", "));
            let row_value = if key_columns.len() == 1 {
                key_columns[0].clone()
            } else {
                format!("({})", key_columns.join(", "))
            };
            if t.must_find {
                let named_keys: Vec<String> = key_values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| format!("{v} AS k{i}"))
                    .collect();
                let source = format!("SELECT {} FROM {rows_from}", named_keys.join(", "));
                out.push(missing_row(&source, "delete from"));
            }
            out.push(statement(format!(
                "DELETE FROM {table} WHERE {row_value} IN ({keys})"
            )));
        }
        OpKind::Sql => {}
    }
    out
}

/// Rows grouped by a key that comes from a lookup, their changes summed
/// (or their least or greatest kept): `k0…` the key, `c0…` the changes.
fn grouped(t: &Template, rows_from: &str) -> String {
    let mut inner: Vec<String> = t
        .key
        .iter()
        .enumerate()
        .map(|(i, (_, v))| format!("{v} AS k{i}"))
        .collect();
    inner.extend(
        t.changes
            .iter()
            .enumerate()
            .map(|(i, (_, _, v))| format!("{v} AS c{i}")),
    );
    let keys: Vec<String> = (0..t.key.len()).map(|i| format!("k{i}")).collect();
    let mut outer = keys.clone();
    outer.extend(t.changes.iter().enumerate().map(|(i, (_, change, _))| {
        let aggregate = match change {
            Change::Min => "min",
            Change::Max => "max",
            _ => "sum",
        };
        format!("{aggregate}(c{i}) AS c{i}")
    }));
    format!(
        "SELECT {} FROM (SELECT {} FROM {rows_from}) AS g GROUP BY {}",
        outer.join(", "),
        inner.join(", "),
        keys.join(", ")
    )
}
