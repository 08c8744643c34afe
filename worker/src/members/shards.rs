//! Where a member lives in MySQL: a member id (or, for the table that keeps
//! identities unique, an identity) hashes to one of `logicalShards` logical
//! shards, and the shard map, which is data kept in MySQL, says which
//! physical database and table hold each range of them. Re-homing a range is
//! a change of rows in that map (as Vitess moves keyspace ranges), not of
//! arithmetic spread through the code.

use std::fmt;

use super::model::Identity;

/// A physical home of logical shards: one database, and the number of the
/// `members_<n>` and `identities_<n>` tables in it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place {
    /// The database (schema).
    pub database: String,
    /// The tables' number.
    pub table: u32,
}

impl Place {
    /// The member table, quoted for SQL.
    pub fn members(&self) -> String {
        format!("`{}`.`members_{}`", self.database, self.table)
    }

    /// The identity table, quoted for SQL.
    pub fn identities(&self) -> String {
        format!("`{}`.`identities_{}`", self.database, self.table)
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.database, self.table)
    }
}

/// Logical shards `first..=last`, homed at `place`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// First logical shard.
    pub first: u32,
    /// Last logical shard, inclusive.
    pub last: u32,
    /// Where they live.
    pub place: Place,
}

/// Why a shard map cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Ranges overlap or leave a gap.
    #[error("the shard map does not cover shard {0} exactly once")]
    Coverage(u32),
    /// The map was made for another number of logical shards.
    #[error("the shard map covers {found} logical shards, the MemberStore asks for {expected}")]
    Count {
        /// The spec's `logicalShards`.
        expected: u32,
        /// What the map covers.
        found: u32,
    },
    /// A database name that MySQL would refuse or that could escape its quoting.
    #[error("database name `{0}` must be 1 to 64 letters, digits or `_`")]
    Database(String),
}

/// The map from logical shard to physical place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    logical: u32,
    // Sorted by `first`, contiguous from 0 to `logical - 1`.
    ranges: Vec<Range>,
}

/// 64-bit FNV-1a: stable across versions and platforms, which the hash a
/// shard is chosen by must be (std's hashers are neither).
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Whether `name` is safe as a database name between backquotes.
fn valid_database(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl ShardMap {
    /// `ranges` as a map of `logical` shards, checked to cover each exactly once.
    pub fn new(logical: u32, mut ranges: Vec<Range>) -> Result<Self, MapError> {
        ranges.sort_by_key(|r| r.first);
        let mut next = 0u32;
        for range in &ranges {
            if range.first != next || range.last < range.first {
                return Err(MapError::Coverage(next));
            }
            if !valid_database(&range.place.database) {
                return Err(MapError::Database(range.place.database.clone()));
            }
            next = range.last.saturating_add(1);
        }
        if next != logical {
            return Err(MapError::Count {
                expected: logical,
                found: next,
            });
        }
        Ok(Self { logical, ranges })
    }

    /// The first layout of a store whose home database is `database`:
    /// `databases` databases `<database>_<n>` of `tables` table pairs each,
    /// every place holding an equal run of consecutive logical shards.
    pub fn initial(database: &str, logical: u32, databases: u32, tables: u32) -> Result<Self, MapError> {
        let places = (databases * tables).clamp(1, logical.max(1));
        let ranges = (0..places)
            .map(|p| Range {
                first: p * logical / places,
                last: (p + 1) * logical / places - 1,
                place: Place {
                    database: format!("{database}_{}", p / tables.max(1)),
                    table: p % tables.max(1),
                },
            })
            .collect();
        Self::new(logical, ranges)
    }

    /// How many logical shards there are.
    pub fn logical(&self) -> u32 {
        self.logical
    }

    /// The ranges, in order.
    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    /// The logical shard of member `id`.
    pub fn member_shard(&self, id: u64) -> u32 {
        let shard = fnv1a(id.to_be_bytes()) % u64::from(self.logical);
        u32::try_from(shard).unwrap_or(0)
    }

    /// The logical shard of `identity` (the row that keeps it unique).
    pub fn identity_shard(&self, identity: &Identity) -> u32 {
        let bytes = [identity.kind.code()].into_iter().chain(identity.value.bytes());
        u32::try_from(fnv1a(bytes) % u64::from(self.logical)).unwrap_or(0)
    }

    /// Where logical shard `shard` lives.
    pub fn place(&self, shard: u32) -> &Place {
        let at = self.ranges.partition_point(|r| r.last < shard);
        // `new` guarantees coverage; a shard past the end maps to the last range.
        &self.ranges[at.min(self.ranges.len() - 1)].place
    }

    /// Where member `id` lives.
    pub fn member_place(&self, id: u64) -> &Place {
        self.place(self.member_shard(id))
    }

    /// Where `identity`'s ownership row lives.
    pub fn identity_place(&self, identity: &Identity) -> &Place {
        self.place(self.identity_shard(identity))
    }

    /// Every place, once each.
    pub fn places(&self) -> Vec<&Place> {
        let mut places: Vec<&Place> = self.ranges.iter().map(|r| &r.place).collect();
        places.sort();
        places.dedup();
        places
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::model::IdentityKind;

    fn place(db: &str, table: u32) -> Place {
        Place {
            database: db.into(),
            table,
        }
    }

    #[test]
    fn the_initial_layout_spreads_equal_runs_of_shards_over_every_place() -> Result<(), MapError> {
        let map = ShardMap::initial("m", 1024, 4, 4)?;
        assert_eq!(map.ranges().len(), 16);
        assert_eq!(map.places().len(), 16);
        assert!(map.ranges().iter().all(|r| r.last - r.first + 1 == 64));
        assert_eq!(map.place(0), &place("m_0", 0));
        assert_eq!(map.place(63), &place("m_0", 0));
        assert_eq!(map.place(64), &place("m_0", 1));
        assert_eq!(map.place(1023), &place("m_3", 3));
        // Fewer shards than places: one place per shard.
        assert_eq!(ShardMap::initial("m", 3, 4, 4)?.places().len(), 3);
        Ok(())
    }

    #[test]
    fn a_map_must_cover_every_shard_exactly_once() {
        let r = |first, last| Range {
            first,
            last,
            place: place("m_0", 0),
        };
        #[rustfmt::skip]
        let table = [
            (vec![r(0, 9)], Ok(())),
            (vec![r(5, 9), r(0, 4)], Ok(())),
            (vec![r(0, 4), r(6, 9)], Err(MapError::Coverage(5))),
            (vec![r(0, 5), r(5, 9)], Err(MapError::Coverage(6))),
            (vec![r(0, 8)], Err(MapError::Count { expected: 10, found: 9 })),
            (vec![r(0, 10)], Err(MapError::Count { expected: 10, found: 11 })),
        ];
        for (ranges, expected) in table {
            assert_eq!(
                ShardMap::new(10, ranges.clone()).map(drop),
                expected,
                "{ranges:?}"
            );
        }
        let escape = Range {
            first: 0,
            last: 9,
            place: place("m`; DROP", 0),
        };
        assert!(matches!(
            ShardMap::new(10, vec![escape]),
            Err(MapError::Database(_))
        ));
    }

    #[test]
    fn re_homing_a_range_moves_only_its_shards() -> Result<(), MapError> {
        let before = ShardMap::initial("m", 1024, 2, 2)?;
        let mut ranges = before.ranges().to_vec();
        ranges[1].place = place("m_9", 0);
        let after = ShardMap::new(1024, ranges)?;
        for id in 1..2_000u64 {
            let shard = before.member_shard(id);
            assert_eq!(
                after.member_shard(id),
                shard,
                "the hash does not depend on the map"
            );
            if (256..512).contains(&shard) {
                assert_eq!(after.member_place(id), &place("m_9", 0));
            } else {
                assert_eq!(after.member_place(id), before.member_place(id));
            }
        }
        Ok(())
    }

    #[test]
    fn shards_are_stable_and_spread_evenly() -> Result<(), MapError> {
        let map = ShardMap::initial("m", 16, 1, 16)?;
        // Pinned: a hash that changed between versions would re-home every member.
        assert_eq!(map.member_shard(1), fnv1a(1u64.to_be_bytes()) as u32 % 16);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut counts = [0u32; 16];
        for id in 1..=16_000u64 {
            counts[map.member_shard(id) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        let phone = Identity::parse(IdentityKind::Phone, "13812345678").map_err(|_| MapError::Coverage(0))?;
        let card = Identity {
            kind: IdentityKind::ElongCard,
            value: phone.value.clone(),
        };
        assert_eq!(map.identity_shard(&phone), map.identity_shard(&phone.clone()));
        assert_ne!(
            (map.identity_shard(&phone), phone.kind),
            (map.identity_shard(&card), card.kind)
        );
        Ok(())
    }
}
