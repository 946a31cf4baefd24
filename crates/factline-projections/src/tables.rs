//! Versioned read-model tables (P4): each version of a projection writes
//! its own tables (`orders_v2`), and readers query a view with the plain
//! name (`orders`) that points at the active version. A rebuild fills the
//! next version's tables beside the active ones; the swap re-points the
//! views and the registry in one transaction.

use factline_core::RecordedEvent;

use crate::ProjectionError;

/// Whether `name` may name a read-model table (or column): 1 to 50
/// lower-case letters, digits or `_`, not starting with a digit.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 50
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// The physical tables of one version of a projection's read model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    /// `schema.` on PostgreSQL, empty on SQLite.
    prefix: String,
    version: u32,
    logical: Vec<String>,
}

impl Tables {
    pub(crate) fn new(
        projection: &str,
        schema: Option<&str>,
        version: u32,
        logical: &[&str],
    ) -> Result<Self, ProjectionError> {
        if let Some(bad) = logical.iter().find(|t| !is_plain_name(t)) {
            return Err(ProjectionError::Invalid {
                projection: projection.to_owned(),
                message: format!(
                    "table name {bad:?} must be 1 to 50 lower-case letters, digits or _"
                ),
            });
        }
        Ok(Tables {
            prefix: schema.map_or(String::new(), |s| format!("{s}.")),
            version,
            logical: logical.iter().map(|t| t.to_string()).collect(),
        })
    }

    /// The table this version writes for `logical`: `<logical>_v<version>`,
    /// schema-qualified on PostgreSQL.
    pub fn get(&self, logical: &str) -> String {
        format!("{}{logical}_v{}", self.prefix, self.version)
    }

    /// [`Tables::get`] without the schema: for naming indexes.
    pub fn local(&self, logical: &str) -> String {
        format!("{logical}_v{}", self.version)
    }

    /// The view readers query for `logical`.
    pub fn view(&self, logical: &str) -> String {
        format!("{}{logical}", self.prefix)
    }

    /// The version whose tables these are.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The logical table names.
    pub fn logical(&self) -> &[String] {
        &self.logical
    }

    /// The same tables at another version (to drop an old one).
    pub(crate) fn at_version(&self, version: u32, logical: &[String]) -> Tables {
        Tables {
            prefix: self.prefix.clone(),
            version,
            logical: logical.to_vec(),
        }
    }

    /// Statements that point every view at this version's tables, after
    /// dropping the views of `old_logical`.
    pub(crate) fn repoint_views(&self, old_logical: &[String]) -> Vec<String> {
        let mut sql: Vec<String> = old_logical
            .iter()
            .map(|t| format!("DROP VIEW IF EXISTS {}", self.view(t)))
            .collect();
        sql.extend(self.logical.iter().map(|t| {
            format!(
                "CREATE VIEW {} AS SELECT * FROM {}",
                self.view(t),
                self.get(t)
            )
        }));
        sql
    }

    pub(crate) fn drop_tables(&self) -> Vec<String> {
        self.logical
            .iter()
            .map(|t| format!("DROP TABLE IF EXISTS {}", self.get(t)))
            .collect()
    }
}

/// Whether a sink serves reads (the active version) or builds a version
/// beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Writes the active version, which readers see.
    Live,
    /// Builds a new version beside the active one.
    Rebuild,
}

/// One of the `count` partitions a projection runs as (P10): it applies
/// the events of the streams that hash to `index`, in global order, and
/// has a checkpoint of its own. A stream belongs to exactly one partition,
/// so per-stream order holds; partitions of one version share its tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    index: u32,
    count: u32,
}

impl Partition {
    /// At most this many partitions.
    pub const MAX: u32 = 256;

    /// Partition `index` of `count` (numbered from 0; 1 to 256 partitions).
    pub fn new(index: u32, count: u32) -> Result<Self, ProjectionError> {
        if count == 0 || count > Self::MAX || index >= count {
            return Err(ProjectionError::Invalid {
                projection: String::new(),
                message: format!(
                    "partition {index} of {count}: a projection runs as 1 to {} partitions, numbered from 0",
                    Self::MAX
                ),
            });
        }
        Ok(Partition { index, count })
    }

    /// Every partition of `count`.
    pub fn all(count: u32) -> Result<Vec<Partition>, ProjectionError> {
        (0..count).map(|i| Partition::new(i, count)).collect()
    }

    /// Its number, from 0.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// How many partitions there are.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether this partition applies the events of `stream_id`.
    pub fn owns(&self, stream_id: &str) -> bool {
        self.count == 1 || partition_of(stream_id, self.count) == self.index
    }
}

/// The events of `events` that `partition` applies: all of them when
/// unpartitioned (borrowed), else those of its streams (copied).
pub(crate) fn owned_events(
    partition: Option<Partition>,
    events: &[RecordedEvent],
) -> std::borrow::Cow<'_, [RecordedEvent]> {
    match partition {
        Some(p) if p.count > 1 => events
            .iter()
            .filter(|e| p.owns(e.stream_id.as_str()))
            .cloned()
            .collect(),
        _ => std::borrow::Cow::Borrowed(events),
    }
}

/// The partition of `count` that `stream_id` belongs to: FNV-1a of the id,
/// the same in every process and build.
pub fn partition_of(stream_id: &str, count: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in stream_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(count.max(1))) as u32
}

/// The checkpoint row of one version of a projection (of one partition
/// when it runs as several).
pub(crate) fn checkpoint_key(name: &str, version: u32, partition: Option<Partition>) -> String {
    match partition.filter(|p| p.count > 1) {
        Some(p) => format!("{name}@v{version}#{}/{}", p.index, p.count),
        None => format!("{name}@v{version}"),
    }
}

/// Refuses to run `partition` (none: one partition) of a version whose
/// stored checkpoints (`keys`, all of that version) say it runs as
/// another number of partitions: the count changes only by a rebuild.
pub(crate) fn check_partitions(
    name: &str,
    version: u32,
    partition: Option<Partition>,
    keys: &[String],
) -> Result<(), ProjectionError> {
    let wanted = partition.map_or(1, |p| p.count);
    for key in keys {
        let stored = crate::admin::parse_checkpoint_key(key).map_or(1, |k| k.partitions);
        if stored != wanted {
            return Err(ProjectionError::Invalid {
                projection: name.to_owned(),
                message: format!(
                    "version {version} runs as {stored} partition(s), not {wanted}; the number of partitions changes with a rebuild"
                ),
            });
        }
    }
    Ok(())
}

/// What the registry says of a projection: its active version and that
/// version's logical tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Active {
    pub version: u32,
    pub tables: Vec<String>,
}

impl Active {
    pub fn tables_text(tables: &[String]) -> String {
        tables.join(",")
    }

    pub fn parse(version: i64, tables: &str) -> Active {
        Active {
            version: version as u32,
            tables: tables
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }
}

/// The refusal of a definition that changed while its version did not.
pub(crate) fn changed_definition(
    name: &str,
    version: u32,
    stored: &str,
    wanted: &str,
) -> ProjectionError {
    ProjectionError::Invalid {
        projection: name.to_owned(),
        message: format!(
            "version {version} was built from another definition (fingerprint {stored}, this one is {wanted}): a changed definition needs a new version, so that one read model is never computed two ways; raise its version to rebuild it"
        ),
    }
}

/// What a batch in `mode` may do, given the registry: `Ok(true)` when it
/// must register this version (the first build of a projection).
pub(crate) fn may_write(
    name: &str,
    mode: Mode,
    version: u32,
    active: Option<&Active>,
) -> Result<bool, ProjectionError> {
    match (mode, active) {
        (Mode::Live, None) => Ok(true),
        (Mode::Live, Some(a)) if a.version == version => Ok(false),
        (Mode::Live, Some(a)) => Err(ProjectionError::NotActive {
            projection: name.to_owned(),
            version,
            active: a.version,
        }),
        (Mode::Rebuild, Some(a)) if a.version == version => Err(ProjectionError::Invalid {
            projection: name.to_owned(),
            message: format!(
                "version {version} is already the active one; a rebuild needs a new version"
            ),
        }),
        (Mode::Rebuild, _) => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partitions are stored (checkpoint keys name them, rebuilds assume
    /// them): the hash must never change. Pinned to FNV-1a's published
    /// vectors ("a" is 0xaf63dc4c8601ec8c, "foobar" 0x85944171f73967e8)
    /// and to ids of every shape, computed apart from this code.
    #[test]
    fn partitions_are_fnv1a_and_never_change() {
        let counts = [2, 4, 16, 256, 1000];
        let golden: [(&str, [u32; 5]); 6] = [
            ("a", [0, 0, 12, 140, 996]),
            ("foobar", [0, 0, 8, 232, 968]),
            ("Order-1", [1, 1, 13, 205, 877]),
            ("Customer-c42", [1, 3, 11, 235, 323]),
            ("Invoice-2026-0001", [1, 3, 7, 151, 63]),
            ("Zürich-1", [0, 2, 2, 178, 858]),
        ];
        for (id, wanted) in golden {
            let got = counts.map(|count| partition_of(id, count));
            assert_eq!(got, wanted, "{id}");
        }
        assert_eq!(0xaf63_dc4c_8601_ec8c_u64 % 1000, 996);
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(partition_of("anything", 0), 0, "no partitions is one");
    }
}
