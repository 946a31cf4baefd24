//! Checking a read model's operations: one kind each, its table and
//! columns, the values' types, what a new row leaves empty.

use super::*;

pub(super) fn op_def(c: &mut Checker<'_>, model: &ReadModel, def: &Spanned<OpDef>) -> Option<Op> {
    let span = def.span();
    let d = def.get_ref();
    let kinds: Vec<(OpKind, Option<&String>)> = [
        (
            OpKind::Insert {
                ignore_existing: d.if_exists == Some(IfExistsDef::Ignore),
            },
            d.insert.as_ref(),
        ),
        (OpKind::Upsert, d.upsert.as_ref()),
        (OpKind::Update, d.update.as_ref()),
        (OpKind::Delete, d.delete.as_ref()),
        (OpKind::Sql, d.sql.as_ref()),
    ]
    .into_iter()
    .filter(|(_, t)| t.is_some())
    .collect();
    let (kind, target) = match kinds[..] {
        [(kind, Some(target))] => (kind, target.clone()),
        [] => {
            c.error(
                &span,
                "an operation needs one of insert, upsert, update, delete or sql",
            );
            return None;
        }
        _ => {
            c.error(
                &span,
                "an operation has exactly one of insert, upsert, update, delete or sql",
            );
            return None;
        }
    };
    let when = d.when.as_ref().and_then(|w| c.condition(w));
    let misplaced = |c: &mut Checker<'_>, field: &str, present: bool| {
        if present {
            c.error(&span, format!("{} takes no `{field}`", kind.name()));
        }
    };
    let has_changes =
        !(d.set.is_empty() && d.add.is_empty() && d.min.is_empty() && d.max.is_empty());
    let skip_missing = d.if_missing == Some(IfMissingDef::Skip);
    if kind == OpKind::Sql {
        misplaced(c, "key", !d.key.is_empty());
        misplaced(c, "values", !d.values.is_empty());
        misplaced(c, "set/add/min/max", has_changes);
        misplaced(c, "if_exists", d.if_exists.is_some());
        let params = values(c, model, None, &d.params, false);
        let mut used = HashSet::new();
        for (offset, piece) in scan(&target) {
            let at = span.start;
            match piece {
                Piece::Table(t) if model.table(t).is_none() => {
                    c.error_at(at, format!("sql: table {{{t}}} is not declared in this read model (at byte {offset} of the SQL)"));
                }
                Piece::Param(p) => {
                    used.insert(p.to_owned());
                    if !params.iter().any(|(n, _)| n == p) {
                        c.error_at(at, format!("sql: parameter :{p} is not in params"));
                    }
                }
                _ => {}
            }
        }
        for (name, _) in &params {
            if !used.contains(name) {
                c.error(&span, format!("sql: param {name} is not used as :{name}"));
            }
        }
        return Some(Op {
            kind,
            table: None,
            when,
            skip_missing,
            key: Vec::new(),
            changes: Vec::new(),
            sql: Some(target),
            params,
        });
    }
    let Some(table) = model.table(&target).cloned() else {
        c.error(
            &span,
            format!(
                "{} {target:?}: the table is not declared in this read model",
                kind.name()
            ),
        );
        return None;
    };
    misplaced(c, "params", !d.params.is_empty());
    if !matches!(kind, OpKind::Insert { .. }) {
        misplaced(c, "if_exists", d.if_exists.is_some());
    }
    let key = values(c, model, Some(&table), &d.key, true);
    let mut changes = Vec::new();
    match kind {
        OpKind::Insert { .. } => {
            misplaced(c, "key", !d.key.is_empty());
            misplaced(c, "set/add/min/max (an insert gives `values`)", has_changes);
            if d.values.is_empty() {
                c.error(&span, format!("insert into {target} gives no values"));
            }
            for (column, v) in values(c, model, Some(&table), &d.values, true) {
                changes.push((column, Change::Set, v));
            }
        }
        _ => {
            misplaced(c, "values", !d.values.is_empty());
            if d.key.is_empty() {
                c.error(&span, format!("{} of {target} has no key", kind.name()));
            }
            if kind == OpKind::Delete {
                misplaced(c, "set/add/min/max", has_changes);
            }
            for (change, map) in [
                (Change::Set, &d.set),
                (Change::Add, &d.add),
                (Change::Min, &d.min),
                (Change::Max, &d.max),
            ] {
                for (column, v) in values(c, model, Some(&table), map, true) {
                    let text = table
                        .column(&column)
                        .is_some_and(|col| col.ty == ColumnType::Text);
                    if change != Change::Set && text {
                        c.error(&span, format!("{target}.{column} is not a number: only numbers take add, min or max"));
                    }
                    if changes.iter().any(|(c, _, _)| *c == column)
                        || key.iter().any(|(k, _)| *k == column)
                    {
                        c.error(
                            &span,
                            format!("column {target}.{column} is changed twice in one operation"),
                        );
                    }
                    changes.push((column, change, v));
                }
            }
            if kind == OpKind::Update && changes.is_empty() {
                c.error(&span, format!("update of {target} changes no column"));
            }
        }
    }
    // Columns as written, whether or not their values checked, so that one
    // mistake is reported once.
    let written: Vec<&str> = [&d.key, &d.values, &d.set, &d.add, &d.min, &d.max]
        .iter()
        .flat_map(|m| m.keys().map(String::as_str))
        .collect();
    let mut key_wrong = false;
    if kind == OpKind::Upsert {
        let mut wanted: Vec<&str> = table.key.iter().map(String::as_str).collect();
        let mut given: Vec<&str> = d.key.keys().map(String::as_str).collect();
        wanted.sort_unstable();
        given.sort_unstable();
        if table.key.is_empty() {
            c.error(
                &span,
                format!("upsert into {target}: the table has no key; declare `key = [...]`"),
            );
        } else if wanted != given {
            c.error(
                &span,
                format!(
                    "upsert into {target}: the key must be the table's key ({})",
                    table.key.join(", ")
                ),
            );
        }
        key_wrong = wanted != given;
    }
    if matches!(kind, OpKind::Insert { .. } | OpKind::Upsert) && !key_wrong {
        // A new row must give every column that is neither nullable nor
        // defaulted.
        for column in &table.columns {
            if !written.contains(&column.name.as_str())
                && !column.nullable
                && column.default.is_none()
            {
                c.error(&span, format!(
                    "{} into {target} leaves column {} empty: it is not nullable and has no default",
                    kind.name(),
                    column.name
                ));
            }
        }
    }
    if !matches!(kind, OpKind::Update | OpKind::Delete) && d.if_missing.is_some() {
        let reads_lookup = key
            .iter()
            .map(|(_, v)| v)
            .chain(changes.iter().map(|(_, _, v)| v))
            .any(|v| v.expr.lookup().is_some());
        if !reads_lookup {
            c.error(
                &span,
                format!(
                    "{} takes `if_missing` only when it reads a lookup",
                    kind.name()
                ),
            );
        }
    }
    Some(Op {
        kind,
        table: Some(target),
        when,
        skip_missing,
        key,
        changes,
        sql: None,
        params: Vec::new(),
    })
}
