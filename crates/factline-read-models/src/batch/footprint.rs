//! What a row (or a group of rows) of a batch reads and writes, by table
//! and key hash: a row joins its operation's last group only if no later
//! group conflicts with it.

use super::*;

/// A row's key as a hash, with its table's: two keys that differ may
/// share a hash, which only makes two rows look dependent (they then stay
/// in order), never the reverse.
pub(super) fn key_of(table: usize, row: &[SqlValue], slots: &[usize]) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    // A fixed seed: the hashes only ever meet each other within a batch.
    let mut hasher = foldhash::fast::FixedState::with_seed(0).build_hasher();
    table.hash(&mut hasher);
    for slot in slots {
        match &row[*slot] {
            SqlValue::Int(i) => (1u8, *i).hash(&mut hasher),
            SqlValue::Real(r) => (2u8, r.to_bits()).hash(&mut hasher),
            SqlValue::Text(t) => (3u8, t).hash(&mut hasher),
            _ => 0u8.hash(&mut hasher),
        }
    }
    hasher.finish()
}

/// The table of a known key, kept beside it.
type Key = (usize, u64);

/// Sets of the keys' own hashes: they need no second hashing.
type KeySet = Set<Key>;

/// A set made empty for nothing: a batch makes one or more per row, and
/// its values are table numbers and key hashes from this process only.
pub(super) type Set<T> = std::collections::HashSet<T, foldhash::fast::FixedState>;

/// Rows by key, and the tables any of them is in.
#[derive(Default)]
pub(super) struct Keys {
    keys: KeySet,
    tables: Set<usize>,
}

impl Keys {
    pub(super) fn insert(&mut self, key: Key) -> bool {
        self.tables.insert(key.0);
        self.keys.insert(key)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Key> {
        self.keys.iter()
    }

    pub(super) fn extend(&mut self, other: Keys) {
        self.keys.extend(other.keys);
        self.tables.extend(other.tables);
    }
}

/// What a row (or a group of rows) reads and writes, by table and key.
#[derive(Default)]
pub(super) struct Footprint {
    /// Every table: raw SQL, or what cannot be told.
    pub(super) everything: bool,
    pub(super) reads: Keys,
    pub(super) reads_any: Set<usize>,
    pub(super) writes: Keys,
    pub(super) writes_any: Set<usize>,
    /// Tables written by upserts that commute with each other when of one
    /// kind (all add, all min or all max).
    pub(super) commuting: Set<(usize, Change)>,
}

/// Whether `keys` (rows by key) or `any` (whole tables) cover the row of
/// `key` in `table` (any row of it when `key` is `None`).
fn touches(keys: &Keys, any: &Set<usize>, table: usize, key: Option<u64>) -> bool {
    any.contains(&table)
        || match key {
            Some(k) => keys.keys.contains(&(table, k)),
            None => keys.tables.contains(&table),
        }
}

impl Footprint {
    pub(super) fn writes_to(&self, table: usize, key: Option<u64>) -> bool {
        touches(&self.writes, &self.writes_any, table, key)
    }

    pub(super) fn reads_of(&self, table: usize, key: Option<u64>) -> bool {
        touches(&self.reads, &self.reads_any, table, key)
    }

    /// Whether `later` (a group after the one `self`'s row would join)
    /// must stay after it.
    pub(super) fn conflicts_with(&self, later: &Footprint) -> bool {
        if self.everything || later.everything {
            return true;
        }
        let commuted = |table: usize| later.commuting.iter().any(|(t, _)| *t == table);
        let read_written = self
            .reads
            .iter()
            .any(|(t, k)| later.writes_to(*t, Some(*k)) || commuted(*t))
            || self
                .reads_any
                .iter()
                .any(|t| later.writes_to(*t, None) || commuted(*t));
        let written = |keys: &Keys, any: &Set<usize>| {
            self.writes
                .iter()
                .any(|(t, k)| touches(keys, any, *t, Some(*k)))
                || self.writes_any.iter().any(|t| touches(keys, any, *t, None))
        };
        let written_commuting = self.writes.iter().any(|(t, _)| commuted(*t))
            || self.writes_any.iter().any(|t| commuted(*t));
        let commuting_touched = self.commuting.iter().any(|(t, kind)| {
            later.reads_of(*t, None)
                || later.writes_to(*t, None)
                || later
                    .commuting
                    .iter()
                    .any(|(u, other)| u == t && other != kind)
        });
        read_written
            || written(&later.reads, &later.reads_any)
            || written(&later.writes, &later.writes_any)
            || written_commuting
            || commuting_touched
    }

    pub(super) fn absorb(&mut self, row: Footprint) {
        self.everything |= row.everything;
        self.reads.extend(row.reads);
        self.reads_any.extend(row.reads_any);
        self.writes.extend(row.writes);
        self.writes_any.extend(row.writes_any);
        self.commuting.extend(row.commuting);
    }
}
