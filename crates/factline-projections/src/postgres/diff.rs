//! Comparing a rebuilt version's tables with the active one's (P5) in
//! PostgreSQL.

use super::*;

pub(super) const POSTGRES: Dialect = Dialect {
    same: |a, b| format!("{a} IS NOT DISTINCT FROM {b}"),
    row_json: |alias, columns| {
        let fields: Vec<String> = columns
            .iter()
            .map(|c| format!("'{c}', {alias}.{c}"))
            .collect();
        format!("json_build_object({})::text", fields.join(", "))
    },
};

/// A table's columns and primary key (both empty when it does not exist).
///
/// (`indkey` is an `int2vector`, whose subscripts start at 0: hence the
/// `+ 1` that keeps 0 for "not in the key".)
pub(super) async fn columns(
    client: &Client,
    table: &str,
) -> Result<(Vec<String>, Vec<String>), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, coalesce(array_position(i.indkey::int2[], a.attnum) + 1, 0)
             FROM pg_attribute a
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&table],
        )
        .await?;
    let mut key: Vec<(i32, String)> = rows
        .iter()
        .filter(|r| r.get::<_, i32>(1) > 0)
        .map(|r| (r.get(1), r.get(0)))
        .collect();
    key.sort();
    Ok((
        rows.iter().map(|r| r.get(0)).collect(),
        key.into_iter().map(|(_, c)| c).collect(),
    ))
}

pub(super) async fn diff_tables(
    client: &Client,
    versions: &str,
    name: &str,
    tables: &Tables,
    samples: usize,
) -> Result<DiffReport, tokio_postgres::Error> {
    let active = client
        .query_opt(
            &format!("SELECT active_version, tables FROM {versions} WHERE name = $1"),
            &[&name],
        )
        .await?
        .map(|r| Active::parse(i64::from(r.get::<_, i32>(0)), r.get(1)));
    let old_tables = active
        .as_ref()
        .map(|a| tables.at_version(a.version, &a.tables));
    let mut logical: Vec<String> = tables.logical().to_vec();
    for t in old_tables.iter().flat_map(|o| o.logical()) {
        if !logical.contains(t) {
            logical.push(t.clone());
        }
    }
    let count = |sql: String| async move {
        client
            .query_one(&sql, &[])
            .await
            .map(|r| r.get::<_, i64>(0) as u64)
    };
    let rows = |sql: String| async move {
        let rows = client.query(&sql, &[]).await?;
        Ok::<_, tokio_postgres::Error>(
            rows.iter()
                .map(|r| row_value(r.get::<_, &str>(0)))
                .collect::<Vec<_>>(),
        )
    };
    let mut report = DiffReport {
        active: active.as_ref().map(|a| a.version),
        candidate: tables.version(),
        tables: Vec::new(),
    };
    for table in logical {
        let new = tables.get(&table);
        let old = old_tables.as_ref().map(|o| o.get(&table));
        let (new_columns, key) = columns(client, &new).await?;
        let (old_columns, _) = match &old {
            Some(old) => columns(client, old).await?,
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
                let (n, sample) = whole_table_sql(&POSTGRES, &new, &new_columns, samples);
                diff.added = count(n).await?;
                diff.added_samples = rows(sample).await?;
            }
            (false, true) => {
                let old = old.as_deref().unwrap_or_default();
                let (n, sample) = whole_table_sql(&POSTGRES, old, &old_columns, samples);
                diff.removed = count(n).await?;
                diff.removed_samples = rows(sample).await?;
            }
            (false, false) => {
                let pair = Pair {
                    old: old.as_deref().unwrap_or_default(),
                    new: &new,
                    key,
                    old_columns,
                    new_columns,
                };
                let sql = diff_sql(&POSTGRES, &pair, samples);
                diff.added = count(sql.added_count).await?;
                diff.added_samples = rows(sql.added_rows).await?;
                diff.removed = count(sql.removed_count).await?;
                diff.removed_samples = rows(sql.removed_rows).await?;
                diff.changed = count(sql.changed_count).await?;
                diff.changed_samples = client
                    .query(&sql.changed_rows, &[])
                    .await?
                    .iter()
                    .map(|r| (row_value(r.get(0)), row_value(r.get(1))))
                    .collect();
            }
        }
        report.tables.push(diff);
    }
    Ok(report)
}
