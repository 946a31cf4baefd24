//! What operators see of and do to the projections of one read-model
//! database, without the projections' code: which there are, where each
//! stands, and pausing and resuming them (`factline projections …`, later
//! the admin API). Rebuilds and retries need the code and go through the
//! sinks.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

/// One projection of a read-model database.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ProjectionInfo {
    /// The projection's name.
    pub name: String,
    /// The version readers see; `None` before the first batch.
    pub active_version: Option<u32>,
    /// The active version's checkpoint.
    pub checkpoint: u64,
    /// Every version with a checkpoint: the active one and rebuilds beside
    /// it, in version order.
    pub versions: Vec<VersionInfo>,
    /// Whether an operator paused it.
    pub paused: bool,
    /// Parked and skipped events of the active version.
    pub parked: u64,
    /// Events an operator skipped instead of applying.
    pub skipped: u64,
}

/// One version of a projection: the active one or a rebuild beside it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VersionInfo {
    /// The version number.
    pub version: u32,
    /// The lowest checkpoint of its partitions: every event up to it is
    /// applied.
    pub checkpoint: u64,
    /// How many partitions it runs as (P10).
    pub partitions: u32,
    /// When its checkpoint last moved.
    pub updated_at: Option<DateTime<Utc>>,
}

/// What a checkpoint row's name says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CheckpointKey<'a> {
    pub name: &'a str,
    pub version: u32,
    /// 1 when unpartitioned.
    pub partitions: u32,
}

/// Parses `name@vN` or `name@vN#i/n`; reactors' rows (no version) give
/// `None`.
pub(crate) fn parse_checkpoint_key(key: &str) -> Option<CheckpointKey<'_>> {
    let (name, rest) = key.rsplit_once("@v")?;
    let (version, partitions) = match rest.split_once('#') {
        Some((version, partition)) => {
            let (_, count) = partition.split_once('/')?;
            (version, count.parse().ok()?)
        }
        None => (rest, 1),
    };
    Some(CheckpointKey {
        name,
        version: version.parse().ok()?,
        partitions,
    })
}

/// Raw rows, gathered into [`ProjectionInfo`]s sorted by name.
#[derive(Default)]
pub(crate) struct Rows {
    /// (name, active version)
    pub registry: Vec<(String, u32)>,
    /// (checkpoint key, position, updated at)
    pub checkpoints: Vec<(String, u64, Option<DateTime<Utc>>)>,
    /// (name, paused)
    pub controls: Vec<(String, bool)>,
    /// (name, version, parked, skipped)
    pub parked: Vec<(String, u32, u64, u64)>,
}

fn entry<'a>(
    infos: &'a mut BTreeMap<String, ProjectionInfo>,
    name: &str,
) -> &'a mut ProjectionInfo {
    infos
        .entry(name.to_owned())
        .or_insert_with(|| ProjectionInfo {
            name: name.to_owned(),
            active_version: None,
            checkpoint: 0,
            versions: Vec::new(),
            paused: false,
            parked: 0,
            skipped: 0,
        })
}

impl Rows {
    pub fn gather(self) -> Vec<ProjectionInfo> {
        let mut infos = BTreeMap::new();
        for (name, version) in self.registry {
            entry(&mut infos, &name).active_version = Some(version);
        }
        for (key, position, updated_at) in &self.checkpoints {
            let Some(key) = parse_checkpoint_key(key) else {
                continue;
            };
            let versions = &mut entry(&mut infos, key.name).versions;
            match versions.iter_mut().find(|v| v.version == key.version) {
                // Another partition of the same version.
                Some(v) => {
                    v.checkpoint = v.checkpoint.min(*position);
                    v.updated_at = v.updated_at.max(*updated_at);
                }
                None => versions.push(VersionInfo {
                    version: key.version,
                    checkpoint: *position,
                    partitions: key.partitions,
                    updated_at: *updated_at,
                }),
            }
        }
        for (name, paused) in self.controls {
            if let Some(info) = infos.get_mut(&name) {
                info.paused = paused;
            }
        }
        for info in infos.values_mut() {
            info.versions.sort_by_key(|v| v.version);
            let active = info.active_version;
            info.checkpoint = info
                .versions
                .iter()
                .find(|v| Some(v.version) == active)
                .map_or(0, |v| v.checkpoint);
            if let Some((_, _, parked, skipped)) = self
                .parked
                .iter()
                .find(|(n, v, _, _)| *n == info.name && Some(*v) == active)
            {
                (info.parked, info.skipped) = (*parked, *skipped);
            }
        }
        infos.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_keys_name_a_projection_a_version_and_partitions() {
        let key = |name, version, partitions| {
            Some(CheckpointKey {
                name,
                version,
                partitions,
            })
        };
        assert_eq!(parse_checkpoint_key("orders@v2"), key("orders", 2, 1));
        assert_eq!(parse_checkpoint_key("orders@v2#3/4"), key("orders", 2, 4));
        assert_eq!(parse_checkpoint_key("a@v1@v3"), key("a@v1", 3, 1));
        assert_eq!(parse_checkpoint_key("mailer"), None);
        assert_eq!(parse_checkpoint_key("x@vlast"), None);
        assert_eq!(parse_checkpoint_key("x@v1#2"), None);
    }

    #[test]
    fn rows_gather_per_projection_with_the_active_version_first_class() {
        let rows = Rows {
            registry: vec![("b".into(), 1)],
            checkpoints: vec![
                ("b@v2#0/2".into(), 9, None),
                ("b@v2#1/2".into(), 7, None),
                ("b@v1".into(), 40, None),
                ("a@v1".into(), 3, None),
                ("reactor".into(), 9, None),
            ],
            controls: vec![("b".into(), true)],
            parked: vec![("b".into(), 1, 2, 1), ("b".into(), 2, 5, 0)],
        };
        let infos = rows.gather();
        assert_eq!(infos.len(), 2);
        assert_eq!(
            (infos[0].name.as_str(), infos[0].active_version),
            ("a", None)
        );
        assert_eq!(infos[0].checkpoint, 0, "no active version yet");
        let b = &infos[1];
        assert_eq!(
            (b.active_version, b.checkpoint, b.paused),
            (Some(1), 40, true)
        );
        assert_eq!(
            b.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!((b.parked, b.skipped), (2, 1));
    }
}
