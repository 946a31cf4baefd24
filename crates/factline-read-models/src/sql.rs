//! SQL of declared read models: the tables' DDL, each operation as one
//! statement both SQLite and PostgreSQL run (`$n` parameters, `ON
//! CONFLICT`, `CASE` instead of `min`/`greatest`), and the scanner that
//! finds `{table}` and `:param` in raw SQL outside quoted text.

use factline_projections::Tables;

use crate::expr::{ColumnType, Expr, Val};
use crate::model::{Change, Lookup, Op, OpKind, ReadModel, Table, ValueSpec};

/// A piece of raw SQL.
#[derive(Debug, PartialEq)]
pub(crate) enum Piece<'a> {
    Text(&'a str),
    /// `{name}`: a table of the read model.
    Table(&'a str),
    /// `:name`: a parameter.
    Param(&'a str),
}

/// Splits raw SQL into text, `{table}` and `:param`, leaving quoted text
/// (`'…'`, `"…"`) and casts (`::`) alone. The offset of each piece is kept
/// for error messages.
pub(crate) fn scan(sql: &str) -> Vec<(usize, Piece<'_>)> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut text_from) = (0, 0);
    let word_end = |from: usize| {
        let mut j = from;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
            j += 1;
        }
        j
    };
    while i < bytes.len() {
        match bytes[i] {
            quote @ (b'\'' | b'"') => {
                i += 1;
                while i < bytes.len() && bytes[i] != quote {
                    i += 1;
                }
                i += 1;
            }
            b':' if bytes.get(i + 1) == Some(&b':') => i += 2,
            b':' if bytes
                .get(i + 1)
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_') =>
            {
                let end = word_end(i + 1);
                out.push((text_from, Piece::Text(&sql[text_from..i])));
                out.push((i, Piece::Param(&sql[i + 1..end])));
                (i, text_from) = (end, end);
            }
            b'{' => {
                let end = word_end(i + 1);
                if bytes.get(end) == Some(&b'}') && end > i + 1 {
                    out.push((text_from, Piece::Text(&sql[text_from..i])));
                    out.push((i, Piece::Table(&sql[i + 1..end])));
                    (i, text_from) = (end + 1, end + 1);
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out.push((text_from, Piece::Text(&sql[text_from.min(sql.len())..])));
    out.retain(|(_, p)| *p != Piece::Text(""));
    out
}

/// Words that write or change the database: a query containing one
/// outside quoted text is not read-only.
const WRITING_WORDS: &[&str] = &[
    "insert",
    "update",
    "delete",
    "replace",
    "merge",
    "upsert",
    "create",
    "drop",
    "alter",
    "truncate",
    "attach",
    "detach",
    "pragma",
    "vacuum",
    "reindex",
    "analyze",
    "grant",
    "revoke",
    "copy",
    "call",
    "do",
    "lock",
    "set",
    "reset",
    "listen",
    "notify",
    "begin",
    "commit",
    "rollback",
    "savepoint",
    "release",
];

/// Why `sql` is not one read-only query, if it is not.
pub(crate) fn not_read_only(sql: &str) -> Option<String> {
    let mut words = Vec::new();
    for (_, piece) in scan(sql) {
        if let Piece::Text(text) = piece {
            let unquoted = strip_quoted(text);
            if unquoted.trim_end().trim_end_matches(';').contains(';') {
                return Some("a query is one statement: it may not contain `;`".into());
            }
            words.extend(
                unquoted
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| !w.is_empty())
                    .map(str::to_ascii_lowercase),
            );
        }
    }
    match words.first().map(String::as_str) {
        Some("select" | "with") => {}
        _ => return Some("a query starts with SELECT or WITH".into()),
    }
    words
        .iter()
        .find(|w| WRITING_WORDS.contains(&w.as_str()))
        .map(|w| format!("a query only reads: {} is not allowed", w.to_uppercase()))
}

fn strip_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut quote = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None => out.push(c),
        }
    }
    out
}

/// A column name quoted for both databases (`"order"` is a column too).
pub(crate) fn ident(name: &str) -> String {
    format!("\"{name}\"")
}

fn literal(value: &Val) -> String {
    match value {
        Val::Null => "NULL".into(),
        Val::Bool(b) => i64::from(*b).to_string(),
        Val::Int(i) => i.to_string(),
        Val::Real(r) => format!("{r:?}"),
        Val::Text(s) => format!("'{}'", s.replace('\'', "''")),
        Val::Json(v) => format!("'{}'", v.to_string().replace('\'', "''")),
    }
}

/// `CREATE TABLE` and `CREATE INDEX` for one table. On SQLite a keyed
/// table is stored in its key (`WITHOUT ROWID`): one B-tree write per row
/// instead of two.
pub(crate) fn create_table(table: &Table, tables: &Tables, sqlite: bool) -> Vec<String> {
    let mut columns: Vec<String> = table
        .columns
        .iter()
        .map(|c| {
            let mut column = format!("{} {}", ident(&c.name), c.ty.sql());
            if !c.nullable {
                column.push_str(" NOT NULL");
            }
            if let Some(default) = &c.default {
                column.push_str(&format!(" DEFAULT {}", literal(default)));
            }
            column
        })
        .collect();
    if !table.key.is_empty() {
        let key: Vec<String> = table.key.iter().map(|k| ident(k)).collect();
        columns.push(format!("PRIMARY KEY ({})", key.join(", ")));
    }
    let name = tables.get(&table.name);
    let without_rowid = if sqlite && !table.key.is_empty() {
        " WITHOUT ROWID"
    } else {
        ""
    };
    let mut ddl = vec![format!(
        "CREATE TABLE IF NOT EXISTS {name} ({}){without_rowid}",
        columns.join(", ")
    )];
    for index in &table.indexes {
        let quoted: Vec<String> = index.iter().map(|c| ident(c)).collect();
        ddl.push(format!(
            "CREATE INDEX IF NOT EXISTS {}_{} ON {name} ({})",
            tables.local(&table.name),
            index.join("_"),
            quoted.join(", ")
        ));
    }
    ddl
}

/// A parameter of a rendered statement: where its value comes from, the
/// type it must have (none: whatever the value is) and what it is called
/// in an error.
#[derive(Clone, Debug)]
pub(crate) struct Param {
    pub value: ValueSpec,
    pub ty: Option<ColumnType>,
    pub nullable: bool,
    pub what: String,
}

/// A statement of an operation, ready for an event's values.
#[derive(Clone, Debug)]
pub(crate) struct Rendered {
    pub sql: String,
    pub params: Vec<Param>,
    /// Set when the statement must change (or find) a row: the message
    /// when it does not.
    pub must_find: Option<String>,
}

/// Builds one statement, numbering its parameters.
struct Builder<'a> {
    model: &'a ReadModel,
    tables: &'a Tables,
    params: Vec<Param>,
}

impl Builder<'_> {
    /// A numbered parameter, cast to its column's type so that both
    /// databases know its type wherever it stands (PostgreSQL cannot
    /// infer it in `SELECT $1`).
    fn param(
        &mut self,
        value: &ValueSpec,
        ty: Option<ColumnType>,
        nullable: bool,
        what: String,
    ) -> String {
        self.params.push(Param {
            value: value.clone(),
            ty,
            nullable,
            what,
        });
        match ty {
            Some(ty) => format!("CAST(${} AS {})", self.params.len(), ty.sql()),
            None => format!("${}", self.params.len()),
        }
    }

    /// A value as SQL: a parameter, or a lookup's subquery.
    fn value(&mut self, table: &Table, column: &str, value: &ValueSpec) -> String {
        let col = table.column(column);
        let (ty, nullable) = col.map_or((None, true), |c| (Some(c.ty), c.nullable));
        match &value.expr {
            Expr::Lookup(name) => {
                let lookup = self.model.lookup(name).cloned();
                match lookup {
                    Some(lookup) => {
                        format!("({})", self.lookup_select(&lookup, &ident(&lookup.column)))
                    }
                    None => "NULL".into(),
                }
            }
            _ => self.param(value, ty, nullable, format!("{}.{column}", table.name)),
        }
    }

    /// `SELECT <what> FROM <lookup's table> WHERE <its key>`.
    fn lookup_select(&mut self, lookup: &Lookup, what: &str) -> String {
        let table = self.model.table(&lookup.table).cloned();
        let conditions: Vec<String> = lookup
            .key
            .iter()
            .map(|(column, value)| {
                let ty = table.as_ref().and_then(|t| t.column(column)).map(|c| c.ty);
                let p = self.param(
                    value,
                    ty,
                    false,
                    format!("lookup.{}'s key {column}", lookup.name),
                );
                format!("{} = {p}", ident(column))
            })
            .collect();
        format!(
            "SELECT {what} FROM {} WHERE {}",
            self.tables.get(&lookup.table),
            conditions.join(" AND ")
        )
    }

    fn key_condition(&mut self, table: &Table, key: &[(String, ValueSpec)]) -> Vec<String> {
        key.iter()
            .map(|(column, value)| {
                format!("{} = {}", ident(column), self.value(table, column, value))
            })
            .collect()
    }

    fn finish(self, sql: String, must_find: Option<String>) -> Rendered {
        Rendered {
            sql,
            params: self.params,
            must_find,
        }
    }
}

/// The lookups an operation's values read.
fn lookups_of(op: &Op) -> Vec<String> {
    let mut names: Vec<String> = op
        .key
        .iter()
        .map(|(_, v)| v)
        .chain(op.changes.iter().map(|(_, _, v)| v))
        .filter_map(|v| v.expr.lookup().map(str::to_owned))
        .collect();
    names.dedup();
    names
}

/// The statements of one operation: for each lookup that must find its
/// row, a check first; then the operation.
pub(crate) fn render(model: &ReadModel, op: &Op, tables: &Tables) -> Vec<Rendered> {
    let mut out = Vec::new();
    let mut guards = Vec::new();
    for name in lookups_of(op) {
        let Some(lookup) = model.lookup(&name) else {
            continue;
        };
        let mut b = Builder {
            model,
            tables,
            params: Vec::new(),
        };
        let select = b.lookup_select(lookup, "1");
        if op.skip_missing {
            guards.push(lookup.clone());
        } else {
            let message = format!(
                "lookup.{name} found no row in {} for this event",
                lookup.table
            );
            out.push(b.finish(select, Some(message)));
        }
    }
    let mut b = Builder {
        model,
        tables,
        params: Vec::new(),
    };
    let guard_sql = |b: &mut Builder<'_>| -> String {
        let mut all: Vec<String> = guards
            .iter()
            .map(|l| format!("EXISTS ({})", b.lookup_select(l, "1")))
            .collect();
        if all.is_empty() {
            all.push("true".into());
        }
        all.join(" AND ")
    };
    let Some(table) = op.table.as_deref().and_then(|t| model.table(t)) else {
        // Raw SQL: `{table}` and `:param` replaced, parameters numbered by
        // name.
        let sql = op.sql.as_deref().unwrap_or_default();
        let mut text = String::new();
        let mut numbered: Vec<&str> = Vec::new();
        for (_, piece) in scan(sql) {
            match piece {
                Piece::Text(t) => text.push_str(t),
                Piece::Table(t) => text.push_str(&tables.get(t)),
                Piece::Param(p) => {
                    let n = match numbered.iter().position(|q| *q == p) {
                        Some(n) => n + 1,
                        None => {
                            numbered.push(p);
                            if let Some((_, value)) = op.params.iter().find(|(name, _)| name == p) {
                                b.param(value, None, true, format!(":{p}"));
                            }
                            numbered.len()
                        }
                    };
                    text.push_str(&format!("${n}"));
                }
            }
        }
        out.push(b.finish(text, None));
        return out;
    };
    let name = tables.get(&table.name);
    let table = table.clone();
    let rendered = match op.kind {
        OpKind::Insert { ignore_existing } => {
            let columns: Vec<String> = op.changes.iter().map(|(c, _, _)| ident(c)).collect();
            let values: Vec<String> = op
                .changes
                .iter()
                .map(|(c, _, v)| b.value(&table, c, v))
                .collect();
            let guard = guard_sql(&mut b);
            let conflict = if ignore_existing {
                " ON CONFLICT DO NOTHING"
            } else {
                ""
            };
            let sql = format!(
                "INSERT INTO {name} ({}) SELECT {} WHERE {guard}{conflict}",
                columns.join(", "),
                values.join(", ")
            );
            b.finish(sql, None)
        }
        OpKind::Upsert => {
            let mut columns = Vec::new();
            let mut values = Vec::new();
            for (c, v) in &op.key {
                columns.push(ident(c));
                values.push(b.value(&table, c, v));
            }
            for (c, _, v) in &op.changes {
                columns.push(ident(c));
                values.push(b.value(&table, c, v));
            }
            let guard = guard_sql(&mut b);
            let key: Vec<String> = op.key.iter().map(|(c, _)| ident(c)).collect();
            let updates: Vec<String> = op
                .changes
                .iter()
                .map(|(c, change, _)| {
                    let (cur, new) = (
                        format!("cur.{}", ident(c)),
                        format!("excluded.{}", ident(c)),
                    );
                    format!("{} = {}", ident(c), combine(*change, &cur, &new))
                })
                .collect();
            let on_conflict = if updates.is_empty() {
                "DO NOTHING".to_owned()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            let sql = format!(
                "INSERT INTO {name} AS cur ({}) SELECT {} WHERE {guard} ON CONFLICT ({}) {on_conflict}",
                columns.join(", "),
                values.join(", "),
                key.join(", ")
            );
            b.finish(sql, None)
        }
        OpKind::Update => {
            let sets: Vec<String> = op
                .changes
                .iter()
                .map(|(c, change, v)| {
                    let new = b.value(&table, c, v);
                    format!("{} = {}", ident(c), combine(*change, &ident(c), &new))
                })
                .collect();
            let mut conditions = b.key_condition(&table, &op.key);
            conditions.push(guard_sql(&mut b));
            let sql = format!(
                "UPDATE {name} SET {} WHERE {}",
                sets.join(", "),
                conditions.join(" AND ")
            );
            let must_find = (!op.skip_missing)
                .then(|| format!("update of {} found no row for this event", table.name));
            b.finish(sql, must_find)
        }
        OpKind::Delete => {
            let mut conditions = b.key_condition(&table, &op.key);
            conditions.push(guard_sql(&mut b));
            let sql = format!("DELETE FROM {name} WHERE {}", conditions.join(" AND "));
            let must_find = (!op.skip_missing)
                .then(|| format!("delete from {} found no row for this event", table.name));
            b.finish(sql, must_find)
        }
        OpKind::Sql => unreachable!("raw SQL has no table"),
    };
    out.push(rendered);
    out
}

/// A column's new value from its current one and the operation's value.
pub(crate) fn combine(change: Change, current: &str, value: &str) -> String {
    match change {
        Change::Set => value.to_owned(),
        Change::Add => format!("COALESCE({current}, 0) + {value}"),
        Change::Min => format!(
            "CASE WHEN {current} IS NULL OR {value} < {current} THEN {value} ELSE {current} END"
        ),
        Change::Max => format!(
            "CASE WHEN {current} IS NULL OR {value} > {current} THEN {value} ELSE {current} END"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanning_finds_tables_and_parameters_outside_quotes_and_casts() {
        let pieces =
            scan("UPDATE {totals} SET n = n + :cents::bigint WHERE id = :id AND note = ':no {no}'");
        let found: Vec<&Piece<'_>> = pieces
            .iter()
            .map(|(_, p)| p)
            .filter(|p| !matches!(p, Piece::Text(_)))
            .collect();
        assert_eq!(
            found,
            [
                &Piece::Table("totals"),
                &Piece::Param("cents"),
                &Piece::Param("id")
            ]
        );
    }

    #[test]
    fn only_one_select_is_read_only() {
        assert_eq!(not_read_only("SELECT * FROM {t} WHERE a = :a"), None);
        assert_eq!(not_read_only("with x as (select 1) select * from x;"), None);
        assert_eq!(not_read_only("SELECT 'delete me' FROM {t}"), None);
        assert!(not_read_only("DELETE FROM {t}")
            .unwrap()
            .contains("starts with SELECT"));
        assert!(not_read_only("SELECT 1; DROP TABLE x")
            .unwrap()
            .contains("`;`"));
        assert!(
            not_read_only("WITH d AS (DELETE FROM {t} RETURNING *) SELECT * FROM d")
                .unwrap()
                .contains("DELETE is not allowed")
        );
    }
}
