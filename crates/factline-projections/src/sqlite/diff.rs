//! Comparing a rebuilt version's tables with the active one's (P5) in SQLite.

use super::*;

pub(super) const SQLITE: Dialect = Dialect {
    same: |a, b| format!("{a} IS {b}"),
    row_json: |alias, columns| {
        let fields: Vec<String> = columns
            .iter()
            .map(|c| format!("'{c}', {alias}.{c}"))
            .collect();
        format!("json_object({})", fields.join(", "))
    },
};

/// A table's columns and primary key (both empty when it does not exist).
pub(super) fn columns(
    conn: &Connection,
    table: &str,
) -> rusqlite::Result<(Vec<String>, Vec<String>)> {
    let mut stmt = conn.prepare("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")?;
    let rows: Vec<(String, i64)> = stmt
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut key: Vec<(i64, String)> = rows
        .iter()
        .filter(|(_, pk)| *pk > 0)
        .map(|(c, pk)| (*pk, c.clone()))
        .collect();
    key.sort();
    Ok((
        rows.into_iter().map(|(c, _)| c).collect(),
        key.into_iter().map(|(_, c)| c).collect(),
    ))
}

pub(super) fn diff_tables(
    conn: &Connection,
    name: &str,
    tables: &Tables,
    samples: usize,
) -> rusqlite::Result<DiffReport> {
    let active = active_version(conn, name)?;
    let old_tables = active
        .as_ref()
        .map(|a| tables.at_version(a.version, &a.tables));
    let mut logical: Vec<String> = tables.logical().to_vec();
    for t in old_tables.iter().flat_map(|o| o.logical()) {
        if !logical.contains(t) {
            logical.push(t.clone());
        }
    }
    let count = |sql: &str| {
        conn.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
    };
    let rows = |sql: &str| -> rusqlite::Result<Vec<serde_json::Value>> {
        let mut stmt = conn.prepare(sql)?;
        let texts: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(texts.iter().map(|t| row_value(t)).collect())
    };
    let mut report = DiffReport {
        active: active.as_ref().map(|a| a.version),
        candidate: tables.version(),
        tables: Vec::new(),
    };
    for table in logical {
        let new = tables.get(&table);
        let old = old_tables.as_ref().map(|o| o.get(&table));
        let (new_columns, key) = columns(conn, &new)?;
        let (old_columns, _) = match &old {
            Some(old) => columns(conn, old)?,
            None => (Vec::new(), Vec::new()),
        };
        let mut diff = TableDiff {
            table: table.clone(),
            added: 0,
            removed: 0,
            changed: 0,
            added_samples: Vec::new(),
            removed_samples: Vec::new(),
            changed_samples: Vec::new(),
        };
        match (old_columns.is_empty(), new_columns.is_empty()) {
            (true, true) => {}
            (true, false) => {
                let (n, sample) = whole_table_sql(&SQLITE, &new, &new_columns, samples);
                diff.added = count(&n)?;
                diff.added_samples = rows(&sample)?;
            }
            (false, true) => {
                let old = old.as_deref().unwrap_or_default();
                let (n, sample) = whole_table_sql(&SQLITE, old, &old_columns, samples);
                diff.removed = count(&n)?;
                diff.removed_samples = rows(&sample)?;
            }
            (false, false) => {
                let pair = Pair {
                    old: old.as_deref().unwrap_or_default(),
                    new: &new,
                    key,
                    old_columns,
                    new_columns,
                };
                let sql = diff_sql(&SQLITE, &pair, samples);
                diff.added = count(&sql.added_count)?;
                diff.added_samples = rows(&sql.added_rows)?;
                diff.removed = count(&sql.removed_count)?;
                diff.removed_samples = rows(&sql.removed_rows)?;
                diff.changed = count(&sql.changed_count)?;
                let mut stmt = conn.prepare(&sql.changed_rows)?;
                diff.changed_samples = stmt
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                    .map(|pair| pair.map(|(a, b)| (row_value(&a), row_value(&b))))
                    .collect::<Result<_, _>>()?;
            }
        }
        report.tables.push(diff);
    }
    Ok(report)
}
