//! A batch of events as a few set-based statements: each operation's rows
//! go in as one JSON array parameter, so a rebuild runs a handful of
//! statements per batch instead of one or two per event.
//!
//! The result must equal applying the events one by one. Rows of one
//! operation are merged into one statement only where that cannot change
//! what any other statement sees: each row's writes and lookups are known
//! by table and key (computed from the event), and a row joins its
//! operation's last group only if no later group reads or writes what it
//! writes or writes what it reads. Rows of one key are combined in Rust
//! (set: the last, add: the sum, min/max) or, when the key comes from a
//! lookup, by `GROUP BY` in SQL (add, min and max only). Whatever cannot be
//! merged exactly (raw SQL, a `set` keyed by a lookup, a nullable column
//! added to) runs as its own statements, in order.

// foldhash: a batch hashes a few keys and table numbers per event.
use foldhash::{HashMap, HashMapExt};

use factline_core::RecordedEvent;
use factline_projections::{ApplyError, Dialect, Expected, SqlValue, Statement, Tables};
use serde_json::Value;

use crate::cache::Found;
use crate::expr::{ColumnType, Expr};
use crate::model::{Change, Op, OpKind, ReadModel, ValueSpec};
use crate::projection::bind;
use crate::sql::{combine, ident, Param};

mod footprint;
mod statements;

use footprint::{key_of, Footprint, Set};
use statements::group_statements;

/// How one operation's rows are put in a statement.
#[derive(Debug)]
pub(crate) struct Template {
    kind: OpKind,
    table: String,
    /// Its table's place among the read model's tables.
    table_index: usize,
    /// The values each row carries, in order (lookup keys included).
    slots: Vec<Param>,
    /// Key columns and the SQL of their value.
    key: Vec<(String, String)>,
    /// Changed (or inserted) columns, how, and the SQL of their value.
    changes: Vec<(String, Change, String)>,
    /// Lookups that must find their row, with the SQL of their key test.
    checked: Vec<(String, String)>,
    /// `EXISTS` guards of lookups that may find nothing.
    guards: Vec<String>,
    /// Those of lookups read by a subquery (not joined): the others' rows
    /// drop out of the join.
    row_guards: Vec<String>,
    /// Lookups of a table's whole key, joined to the rows: one probe a
    /// row finds the value and whether there is one.
    joins: String,
    /// The slots of the key when it is known from the event.
    key_slots: Option<Vec<usize>>,
    /// The slots of the row this writes, in its table's key order, when
    /// known from the event (else it may write any row of its table).
    write_key: Option<Vec<usize>>,
    /// The lookups read: (table, slots of the row in key order, or `None`
    /// when they find rows by other columns).
    reads: Vec<(usize, Option<Vec<usize>>)>,
    must_find: bool,
    /// Upserts that only add (or only keep the least, or the greatest)
    /// commute with each other on their table: which of these, if any.
    commutes: Option<Change>,
    /// With lookups resolved from the cache: per lookup, its key's slots
    /// (in the lookup's key order) and the slot its value goes in.
    pub(crate) resolved: Vec<(usize, Vec<usize>, usize)>,
}

impl Template {
    /// Whether its rows read no table (no lookup: each one read, guarded
    /// or checked, is among `reads`).
    pub(crate) fn reads_nothing(&self) -> bool {
        self.reads.is_empty()
    }

    /// The slot of the value an insert writes to `column`.
    pub(crate) fn inserted_slot(&self, column: &str) -> Option<usize> {
        let (_, _, sql) = self.changes.iter().find(|(c, _, _)| c == column)?;
        slot_of(sql)
    }
}

/// `columns` (with their slots) in the order of `key`, if they are
/// exactly its columns.
fn in_key_order(key: &[String], columns: &[(String, usize)]) -> Option<Vec<usize>> {
    if key.is_empty() || key.len() != columns.len() {
        return None;
    }
    key.iter()
        .map(|k| columns.iter().find(|(c, _)| c == k).map(|(_, s)| *s))
        .collect()
}

/// Whether `op` can be merged, and how. With `cached` (which lookups
/// are), the template of its rows whose lookups the cache resolved: their
/// values are slots of the row; `None` unless every lookup it reads is
/// cached.
pub(crate) fn template(model: &ReadModel, op: &Op, cached: Option<&[bool]>) -> Option<Template> {
    let table_name = op.table.clone()?;
    let table = model.table(&table_name)?;
    let index_of = |name: &str| {
        model
            .tables
            .iter()
            .position(|t| t.name == name)
            .unwrap_or(usize::MAX)
    };
    let mut t = Template {
        kind: op.kind,
        table_index: index_of(&table_name),
        table: table_name.clone(),
        slots: Vec::new(),
        key: Vec::new(),
        changes: Vec::new(),
        checked: Vec::new(),
        guards: Vec::new(),
        row_guards: Vec::new(),
        joins: String::new(),
        key_slots: Some(Vec::new()),
        write_key: None,
        reads: Vec::new(),
        must_find: false,
        commutes: None,
        resolved: Vec::new(),
    };
    let mut lookup_sql: HashMap<String, String> = HashMap::new();
    let mut value_sql = |t: &mut Template, column: &str, value: &ValueSpec| -> Option<String> {
        if let Expr::Lookup(name) = &value.expr {
            if let Some(select) = lookup_sql.get(name) {
                return Some(select.clone());
            }
            let lookup = model.lookup(name)?;
            let lookup_table = model.table(&lookup.table)?;
            if let Some(cached) = cached {
                let index = model.lookups.iter().position(|l| l.name == *name)?;
                if !cached.get(index).copied().unwrap_or(false) {
                    return None;
                }
                let mut key_slots = Vec::new();
                for (column, value) in &lookup.key {
                    let col = lookup_table.column(column)?;
                    key_slots.push(t.slots.len());
                    t.slots.push(Param {
                        value: value.clone(),
                        ty: Some(col.ty),
                        nullable: false,
                        what: format!("lookup.{name}'s key {column}"),
                    });
                }
                let ty = lookup_table.column(&lookup.column)?.ty;
                let slot = t.slots.len();
                // Filled from the cache, not bound from the event.
                t.slots.push(Param {
                    value: value.clone(),
                    ty: Some(ty),
                    nullable: true,
                    what: format!("lookup.{name}"),
                });
                t.resolved.push((index, key_slots, slot));
                let select = slot_sql(slot, ty);
                lookup_sql.insert(name.clone(), select.clone());
                return Some(select);
            }
            let mut tests = Vec::new();
            let mut slots = Vec::new();
            for (column, value) in &lookup.key {
                let col = lookup_table.column(column)?;
                slots.push((column.clone(), t.slots.len()));
                let slot = slot_sql(t.slots.len(), col.ty);
                t.slots.push(Param {
                    value: value.clone(),
                    ty: Some(col.ty),
                    nullable: false,
                    what: format!("lookup.{name}'s key {column}"),
                });
                tests.push(format!("l.{} = {slot}", ident(column)));
            }
            let from = format!(
                "{{table:{}}} AS l WHERE {}",
                lookup.table,
                tests.join(" AND ")
            );
            let exists = format!("EXISTS (SELECT 1 FROM {from})");
            let row_key = in_key_order(&lookup_table.key, &slots);
            // A lookup by the table's key finds at most one row: joined, it
            // is one probe instead of a test and a subquery.
            let select = if row_key.is_some() {
                let alias = format!("l{}", lookup_sql.len());
                let on: Vec<String> = tests
                    .iter()
                    .map(|test| format!("{alias}{}", &test[1..]))
                    .collect();
                t.joins.push_str(&format!(
                    " JOIN {{table:{}}} AS {alias} ON {}",
                    lookup.table,
                    on.join(" AND ")
                ));
                format!("{alias}.{}", ident(&lookup.column))
            } else {
                if op.skip_missing {
                    t.row_guards.push(exists.clone());
                }
                format!("(SELECT l.{} FROM {from})", ident(&lookup.column))
            };
            if op.skip_missing {
                t.guards.push(exists);
            } else {
                t.checked.push((name.clone(), exists));
            }
            t.reads.push((index_of(&lookup.table), row_key));
            lookup_sql.insert(name.clone(), select.clone());
            return Some(select);
        }
        let col = table.column(column)?;
        let index = t.slots.len();
        t.slots.push(Param {
            value: value.clone(),
            ty: Some(col.ty),
            nullable: col.nullable,
            what: format!("{}.{column}", table.name),
        });
        Some(slot_sql(index, col.ty))
    };
    for (column, value) in &op.key {
        let sql = value_sql(&mut t, column, value)?;
        match (slot_of(&sql), &mut t.key_slots) {
            (Some(slot), Some(slots)) => slots.push(slot),
            (None, _) => t.key_slots = None,
            _ => {}
        }
        t.key.push((column.clone(), sql));
    }
    for (column, change, value) in &op.changes {
        let sql = value_sql(&mut t, column, value)?;
        t.changes.push((column.clone(), *change, sql));
    }
    // The row written, when every column of the table's key is a value
    // of the event.
    let plain = |columns: &mut dyn Iterator<Item = (&String, &String)>| -> Vec<(String, usize)> {
        columns
            .filter_map(|(c, sql)| slot_of(sql).map(|s| (c.clone(), s)))
            .collect()
    };
    t.write_key = match op.kind {
        OpKind::Insert { .. } => {
            let columns = plain(&mut t.changes.iter().map(|(c, _, sql)| (c, sql)));
            let key_columns: Vec<(String, usize)> = columns
                .into_iter()
                .filter(|(c, _)| table.key.contains(c))
                .collect();
            in_key_order(&table.key, &key_columns)
        }
        _ if t.key.len() == op.key.len() => {
            let columns = plain(&mut t.key.iter().map(|(c, sql)| (c, sql)));
            in_key_order(&table.key, &columns)
        }
        _ => None,
    };
    let commutative = t.changes.iter().all(|(_, c, _)| *c != Change::Set);
    let nullable_sum = t.changes.iter().any(|(column, change, _)| {
        *change != Change::Set && table.column(column).is_some_and(|c| c.nullable)
    });
    let merges = match op.kind {
        OpKind::Insert { .. } => true,
        OpKind::Upsert | OpKind::Update => !nullable_sum && (t.key_slots.is_some() || commutative),
        OpKind::Delete => t.key_slots.is_some(),
        OpKind::Sql => false,
    };
    t.must_find = matches!(op.kind, OpKind::Update | OpKind::Delete) && !op.skip_missing;
    let first = t.changes.first().map(|(_, c, _)| *c);
    t.commutes = first.filter(|c| {
        op.kind == OpKind::Upsert
            && *c != Change::Set
            && !nullable_sum
            && t.changes.iter().all(|(_, other, _)| other == c)
    });
    let resolving = cached.is_some() && !t.resolved.is_empty();
    (merges && (cached.is_none() || resolving)).then_some(t)
}

/// Field `i` of a row, as a value of type `ty`.
fn slot_sql(i: usize, ty: ColumnType) -> String {
    format!("CAST(e.value ->> {i} AS {})", ty.sql())
}

/// The rows of one group as the JSON array parameter.
fn rows_json(rows: &[Vec<SqlValue>]) -> String {
    let rows: Vec<Value> = rows
        .iter()
        .map(|row| {
            Value::Array(
                row.iter()
                    .map(|v| match v {
                        SqlValue::Int(i) => Value::from(*i),
                        SqlValue::Real(r) => {
                            serde_json::Number::from_f64(*r).map_or(Value::Null, Value::Number)
                        }
                        SqlValue::Text(s) => Value::String(s.clone()),
                        _ => Value::Null,
                    })
                    .collect(),
            )
        })
        .collect();
    Value::Array(rows).to_string()
}

/// Rows of one key combined as applying them in order would: `set` keeps
/// the last value, `add` sums, `min`/`max` keep the smallest/largest.
fn combine_rows(template: &Template, rows: Vec<Vec<SqlValue>>) -> Vec<Vec<SqlValue>> {
    let Some(key_slots) = &template.key_slots else {
        return rows;
    };
    // The slot of each changed column's value (lookups are not combined:
    // their value is the same for one key).
    let change_slots: Vec<(usize, Change)> = template
        .changes
        .iter()
        .filter_map(|(_, change, sql)| slot_of(sql).map(|s| (s, *change)))
        .collect();
    let mut order: Vec<crate::cache::Key> = Vec::new();
    let mut combined: HashMap<crate::cache::Key, Vec<SqlValue>> = HashMap::new();
    for row in rows {
        let key = crate::cache::key_of(&row, key_slots);
        match combined.get_mut(&key) {
            None => {
                order.push(key.clone());
                combined.insert(key, row);
            }
            Some(acc) => {
                for (slot, change) in &change_slots {
                    let (a, b) = (&acc[*slot], &row[*slot]);
                    acc[*slot] = match (change, a, b) {
                        (Change::Set, _, b) => b.clone(),
                        (Change::Add, SqlValue::Int(x), SqlValue::Int(y)) => {
                            SqlValue::Int(x.saturating_add(*y))
                        }
                        (Change::Add, SqlValue::Real(x), SqlValue::Real(y)) => {
                            SqlValue::Real(x + y)
                        }
                        (Change::Min, SqlValue::Int(x), SqlValue::Int(y)) => {
                            SqlValue::Int(*x.min(y))
                        }
                        (Change::Max, SqlValue::Int(x), SqlValue::Int(y)) => {
                            SqlValue::Int(*x.max(y))
                        }
                        (Change::Min, SqlValue::Real(x), SqlValue::Real(y)) => {
                            SqlValue::Real(x.min(*y))
                        }
                        (Change::Max, SqlValue::Real(x), SqlValue::Real(y)) => {
                            SqlValue::Real(x.max(*y))
                        }
                        (_, _, b) => b.clone(),
                    };
                }
                // Other slots (lookup keys) are the same for one key, or
                // only read: the last row's stand.
                for (i, value) in row.into_iter().enumerate() {
                    if !change_slots.iter().any(|(s, _)| *s == i) {
                        acc[i] = value;
                    }
                }
            }
        }
    }
    order
        .into_iter()
        .filter_map(|k| combined.remove(&k))
        .collect()
}

/// The slot a value's SQL reads, if it is a plain slot.
fn slot_of(sql: &str) -> Option<usize> {
    let rest = sql.strip_prefix("CAST(e.value ->> ")?;
    rest[..rest.find(' ')?].parse().ok()
}

/// An operation (event type, index) and whether its rows were resolved
/// from the cache.
type OpId = (usize, usize, bool);

/// The values of a row of `template` from `event`.
fn bind_row(
    template: &Template,
    event: &RecordedEvent,
    data: &Value,
) -> Result<Vec<SqlValue>, ApplyError> {
    template
        .slots
        .iter()
        .map(|p| bind(p, event, data))
        .collect()
}

/// A run of rows of one operation, or one event's own statements.
enum Group {
    Rows {
        op: OpId,
        rows: Vec<Vec<SqlValue>>,
        keys: Set<u64>,
        footprint: Footprint,
    },
    Single {
        statements: Vec<Statement>,
        footprint: Footprint,
    },
}

impl Group {
    fn footprint(&self) -> &Footprint {
        match self {
            Group::Rows { footprint, .. } | Group::Single { footprint, .. } => footprint,
        }
    }
}

/// The batch's statements, or `None` to apply it event by event.
pub(crate) fn statements(
    projection: &mut crate::DeclaredProjection,
    dialect: Dialect,
    tables: &Tables,
    events: &[RecordedEvent],
) -> Result<Vec<Statement>, ApplyError> {
    let model = projection.model_arc();
    let templates = projection.templates();
    let (resolved, plan) = projection.cache_plan();
    if let (Some(first), Some(last)) = (events.first(), events.last()) {
        projection.cache.batch(first.position, last.position);
    }
    let mut groups: Vec<Group> = Vec::new();
    let mut last_of: HashMap<OpId, usize> = HashMap::new();
    for event in events {
        let Some((handler, data)) = projection.applies(event)? else {
            continue;
        };
        let ops = &model.handlers[handler].1;
        'ops: for (index, op) in ops.iter().enumerate() {
            if op.when.as_ref().is_some_and(|w| !w.holds(event, &data)) {
                continue;
            }
            // Rows whose lookups the cache resolves need no SQL to find
            // them, and sum in Rust by their whole key.
            let mut cached_row = None;
            if let Some(template) = &resolved[handler][index] {
                let mut row = bind_row(template, event, &data)?;
                let mut all_found = true;
                for (lookup, key_slots, value_slot) in &template.resolved {
                    match projection
                        .cache
                        .find(*lookup, crate::cache::key_of(&row, key_slots))
                    {
                        Found::Value(value) => row[*value_slot] = value,
                        // As the SQL would: nothing to apply.
                        Found::Absent if op.skip_missing => continue 'ops,
                        // The SQL finds nothing, and says which event.
                        Found::Absent | Found::Unknown => {
                            all_found = false;
                            break;
                        }
                    }
                }
                if all_found {
                    cached_row = Some((template, row));
                }
            }
            let (template, row, id) = match cached_row {
                Some((template, row)) => (template, row, (handler, index, true)),
                None => {
                    let Some(template) = &templates[handler][index] else {
                        // Not mergeable: this event's statements of this operation,
                        // in order, touching whatever they touch.
                        let statements =
                            projection.op_statements(tables, handler, index, event, &data)?;
                        groups.push(Group::Single {
                            statements,
                            footprint: Footprint {
                                everything: true,
                                ..Footprint::default()
                            },
                        });
                        continue;
                    };
                    let row = bind_row(template, event, &data)?;
                    let fill = &plan.fills[handler][index];
                    for (lookup, key_slots, value_slot) in &fill.lookups {
                        let key = crate::cache::key_of(&row, key_slots);
                        projection.cache.inserted(
                            *lookup,
                            key,
                            &row[*value_slot],
                            fill.ignore_existing,
                        );
                    }
                    (template, row, (handler, index, false))
                }
            };
            let mut footprint = Footprint::default();
            for (table, slots) in &template.reads {
                match slots {
                    Some(slots) => footprint
                        .reads
                        .insert((*table, key_of(*table, &row, slots))),
                    None => footprint.reads_any.insert(*table),
                };
            }
            let table = template.table_index;
            let key = template.key_slots.as_ref().map(|s| key_of(table, &row, s));
            match (template.commutes, &template.write_key) {
                (Some(kind), _) => footprint.commuting.insert((table, kind)),
                (None, Some(slots)) => footprint.writes.insert((table, key_of(table, &row, slots))),
                (None, None) => footprint.writes_any.insert(table),
            };
            let joinable = last_of.get(&id).copied().filter(|g| {
                let reads_own_group = match &groups[*g] {
                    Group::Rows {
                        footprint: own,
                        keys,
                        ..
                    } => {
                        let own_commuting = |t: usize| own.commuting.iter().any(|(u, _)| *u == t);
                        footprint
                            .reads
                            .iter()
                            .any(|(t, k)| own.writes_to(*t, Some(*k)) || own_commuting(*t))
                            || footprint
                                .reads_any
                                .iter()
                                .any(|t| own.writes_to(*t, None) || own_commuting(*t))
                            || (template.kind == OpKind::Delete
                                && key.is_some_and(|k| keys.contains(&k)))
                    }
                    Group::Single { .. } => true,
                };
                !reads_own_group
                    && groups[g + 1..]
                        .iter()
                        .all(|later| !footprint.conflicts_with(later.footprint()))
            });
            match joinable {
                Some(g) => {
                    if let Group::Rows {
                        rows,
                        keys,
                        footprint: own,
                        ..
                    } = &mut groups[g]
                    {
                        rows.push(row);
                        keys.extend(key);
                        own.absorb(footprint);
                    }
                }
                None => {
                    last_of.insert(id, groups.len());
                    groups.push(Group::Rows {
                        op: id,
                        rows: vec![row],
                        keys: key.into_iter().collect(),
                        footprint,
                    });
                }
            }
        }
    }
    let mut out = Vec::new();
    for group in groups {
        match group {
            Group::Single { statements, .. } => out.extend(statements),
            Group::Rows { op, rows, .. } => {
                let chosen = if op.2 { &resolved } else { &templates };
                let Some(template) = &chosen[op.0][op.1] else {
                    continue;
                };
                let rows = if matches!(template.kind, OpKind::Upsert | OpKind::Update) {
                    combine_rows(template, rows)
                } else {
                    rows
                };
                out.extend(group_statements(template, dialect, tables, &rows));
            }
        }
    }
    Ok(out)
}
