//! Lookup values remembered between batches, so a batch resolves most of
//! its lookups in memory and sums their rows before any SQL runs.
//!
//! Only a lookup whose table never changes a row once written is cached:
//! the read model writes that table with inserts alone (no upsert, update,
//! delete or raw SQL anywhere), each merged into set-based statements and
//! reading no lookup of its own, and the lookup finds rows by the table's
//! whole key. A value is relied on only once the batch that wrote it has
//! committed: a batch's values wait until the next batch starts after its
//! last event (a batch that failed is planned again from the same or an
//! earlier event, and its values are dropped). That a key is *absent* is
//! known only while the run started from checkpoint 0 as the table's sole
//! writer and every event since went through set-based batches.

use factline_projections::SqlValue;
use foldhash::HashMap;

use crate::batch::Template;
use crate::model::{OpKind, ReadModel};

/// Most values kept; past it the cache starts over (and no longer knows
/// which keys are absent).
const MAX_ENTRIES: usize = 2_000_000;

/// One part of a key, compared exactly.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum KeyPart {
    Null,
    Int(i64),
    /// A real by its bits: keys of reals are compared as stored.
    Real(u64),
    Text(Box<str>),
}

/// A key's values, in the order of the table's key.
pub(crate) type Key = Vec<KeyPart>;

/// The key made of `slots` of `row`.
pub(crate) fn key_of(row: &[SqlValue], slots: &[usize]) -> Key {
    slots
        .iter()
        .map(|s| match &row[*s] {
            SqlValue::Int(i) => KeyPart::Int(*i),
            SqlValue::Real(r) => KeyPart::Real(r.to_bits()),
            SqlValue::Text(t) => KeyPart::Text(t.as_str().into()),
            _ => KeyPart::Null,
        })
        .collect()
}

/// Which lookups are cached, and which inserts fill them.
#[derive(Debug, Default)]
pub(crate) struct CachePlan {
    /// Per lookup (in the model's order): whether it is cached.
    pub(crate) cached: Vec<bool>,
    /// Per event type and operation: the cached lookups an insert's rows
    /// fill (lookup, the row's key slots in the lookup's key order, the
    /// slot of the looked-up column), and whether it ignores rows that
    /// exist.
    pub(crate) fills: Vec<Vec<Fill>>,
}

/// What one insert's rows tell the cache.
#[derive(Debug, Default)]
pub(crate) struct Fill {
    pub(crate) lookups: Vec<(usize, Vec<usize>, usize)>,
    pub(crate) ignore_existing: bool,
}

impl CachePlan {
    /// The plan of `model`, whose operations merge as `templates` say.
    pub(crate) fn of(model: &ReadModel, templates: &[Vec<Option<Template>>]) -> Self {
        let ops = || {
            model.handlers.iter().enumerate().flat_map(|(h, (_, ops))| {
                ops.iter()
                    .enumerate()
                    .map(move |(i, op)| (op, templates[h][i].as_ref()))
            })
        };
        let raw_sql = ops().any(|(op, _)| op.kind == OpKind::Sql);
        let cached: Vec<bool> = model
            .lookups
            .iter()
            .map(|lookup| {
                let Some(table) = model.table(&lookup.table) else {
                    return false;
                };
                let by_whole_key = table.key.len() == lookup.key.len()
                    && table
                        .key
                        .iter()
                        .all(|k| lookup.key.iter().any(|(c, _)| c == k));
                let written_by_inserts_alone = ops()
                    .filter(|(op, _)| op.table.as_deref() == Some(lookup.table.as_str()))
                    .all(|(op, template)| {
                        matches!(op.kind, OpKind::Insert { .. })
                            && template.is_some_and(|t| {
                                t.reads_nothing()
                                    && t.inserted_slot(&lookup.column).is_some()
                                    && lookup.key.iter().all(|(c, _)| t.inserted_slot(c).is_some())
                            })
                    });
                !raw_sql && by_whole_key && written_by_inserts_alone
            })
            .collect();
        let fills = model
            .handlers
            .iter()
            .enumerate()
            .map(|(h, (_, ops))| {
                ops.iter()
                    .enumerate()
                    .map(|(i, op)| {
                        let (Some(t), OpKind::Insert { ignore_existing }) =
                            (templates[h][i].as_ref(), op.kind)
                        else {
                            return Fill::default();
                        };
                        let lookups = model
                            .lookups
                            .iter()
                            .enumerate()
                            .filter(|(l, lookup)| {
                                cached[*l] && op.table.as_deref() == Some(lookup.table.as_str())
                            })
                            .filter_map(|(l, lookup)| {
                                let key = lookup
                                    .key
                                    .iter()
                                    .map(|(c, _)| t.inserted_slot(c))
                                    .collect::<Option<Vec<usize>>>()?;
                                Some((l, key, t.inserted_slot(&lookup.column)?))
                            })
                            .collect();
                        Fill {
                            lookups,
                            ignore_existing,
                        }
                    })
                    .collect()
            })
            .collect();
        CachePlan { cached, fills }
    }
}

/// What the cache says of a lookup.
pub(crate) enum Found {
    Value(SqlValue),
    /// The table has no row of the key.
    Absent,
    /// Only the database knows.
    Unknown,
}

/// The values of cached lookups, by lookup and key.
#[derive(Default)]
pub(crate) struct LookupCache {
    /// Whether a key not here is known to be absent from the table.
    complete: bool,
    committed: HashMap<(usize, Key), SqlValue>,
    /// Values written by the batch being planned or the last one, which
    /// may not have committed.
    pending: HashMap<(usize, Key), SqlValue>,
    /// The first and last positions of the batch `pending` is from.
    pending_span: Option<(u64, u64)>,
}

impl LookupCache {
    /// A run starts reading on from `checkpoint`.
    pub(crate) fn resuming(&mut self, checkpoint: u64, sole_writer: bool) {
        self.pending.clear();
        self.pending_span = None;
        if checkpoint == 0 {
            // Nothing applied: the tables hold none of this version's rows.
            self.committed.clear();
        }
        self.complete = checkpoint == 0 && sole_writer;
    }

    /// The event at `position` is applied on its own; `fills` when it may
    /// write a cached table (what it writes is not known here).
    pub(crate) fn applied_singly(&mut self, position: u64, fills: bool) {
        if let Some((_, pending_last)) = self.pending_span.take() {
            // After the last batch: it committed. Within it: it was cut
            // short, and is being applied again a piece at a time.
            if position > pending_last {
                self.committed.extend(self.pending.drain());
            } else {
                self.pending.clear();
            }
        }
        if fills {
            self.complete = false;
        }
    }

    /// A batch of the events from `first` to `last` is being planned.
    pub(crate) fn batch(&mut self, first: u64, last: u64) {
        if let Some((_, pending_last)) = self.pending_span {
            // A later batch follows only a committed one.
            if first > pending_last {
                self.committed.extend(self.pending.drain());
            } else {
                self.pending.clear();
            }
        }
        if self.committed.len() > MAX_ENTRIES {
            self.committed.clear();
            self.complete = false;
        }
        self.pending_span = Some((first, last));
    }

    pub(crate) fn find(&self, lookup: usize, key: Key) -> Found {
        let key = (lookup, key);
        match self.pending.get(&key).or_else(|| self.committed.get(&key)) {
            Some(value) => Found::Value(value.clone()),
            None if self.complete => Found::Absent,
            None => Found::Unknown,
        }
    }

    /// An insert of the batch being planned writes `value` at `key`.
    pub(crate) fn inserted(
        &mut self,
        lookup: usize,
        key: Key,
        value: &SqlValue,
        ignore_existing: bool,
    ) {
        // A row kept only if its key was absent: known when complete, or
        // when an existing row would fail the batch instead.
        if !self.complete && ignore_existing {
            return;
        }
        let key = (lookup, key);
        if self.committed.contains_key(&key) {
            // The first row of a key stays (a second insert is ignored, or
            // fails the batch).
            return;
        }
        self.pending.entry(key).or_insert_with(|| value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(order: &str) -> Key {
        vec![KeyPart::Text(order.into())]
    }

    fn value(found: Found) -> Option<SqlValue> {
        match found {
            Found::Value(v) => Some(v),
            _ => None,
        }
    }

    #[test]
    fn values_count_once_their_batch_is_followed_by_a_later_one() {
        let mut cache = LookupCache::default();
        cache.resuming(0, true);
        cache.batch(1, 10);
        cache.inserted(0, key("a"), &SqlValue::Text("eu".into()), true);
        assert_eq!(
            value(cache.find(0, key("a"))),
            Some(SqlValue::Text("eu".into()))
        );
        // Planned again from the same event: the first try did not commit.
        cache.batch(1, 5);
        assert!(matches!(cache.find(0, key("a")), Found::Absent));
        cache.inserted(0, key("a"), &SqlValue::Text("us".into()), true);
        cache.batch(6, 10);
        assert_eq!(
            value(cache.find(0, key("a"))),
            Some(SqlValue::Text("us".into()))
        );
        // A second insert of a key keeps the first row.
        cache.inserted(0, key("a"), &SqlValue::Text("apac".into()), true);
        assert_eq!(
            value(cache.find(0, key("a"))),
            Some(SqlValue::Text("us".into()))
        );
    }

    #[test]
    fn absence_is_known_only_from_checkpoint_zero_as_sole_writer_in_batches() {
        let mut cache = LookupCache::default();
        cache.resuming(7, true);
        cache.batch(8, 9);
        assert!(matches!(cache.find(0, key("a")), Found::Unknown));
        // Not known to be absent: an ignored insert may have kept another row.
        cache.inserted(0, key("a"), &SqlValue::Text("eu".into()), true);
        assert!(matches!(cache.find(0, key("a")), Found::Unknown));
        // An insert that would fail on an existing row is known once committed.
        cache.inserted(0, key("b"), &SqlValue::Text("eu".into()), false);
        assert!(matches!(cache.find(0, key("b")), Found::Value(_)));

        cache.resuming(0, false);
        cache.batch(1, 2);
        assert!(matches!(cache.find(0, key("a")), Found::Unknown));
        cache.resuming(0, true);
        cache.batch(1, 2);
        assert!(matches!(cache.find(0, key("a")), Found::Absent));
        cache.inserted(0, key("c"), &SqlValue::Text("eu".into()), true);
        cache.applied_singly(2, false);
        assert!(matches!(cache.find(0, key("a")), Found::Absent));
        assert!(
            matches!(cache.find(0, key("c")), Found::Absent),
            "a batch cut short by an event of it applied singly leaves nothing"
        );
        cache.batch(3, 4);
        cache.inserted(0, key("d"), &SqlValue::Text("eu".into()), true);
        cache.applied_singly(5, true);
        assert!(
            matches!(cache.find(0, key("d")), Found::Value(_)),
            "an event after a batch shows it committed"
        );
        assert!(matches!(cache.find(0, key("a")), Found::Unknown));
    }
}
