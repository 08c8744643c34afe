//! The members in MySQL: the shard map in the store's home database, and in
//! each physical place a `members_<n>` table (by member id) and an
//! `identities_<n>` table (by identity, whose primary key keeps an identity
//! bound to one member). A change is one transaction over both: the member's
//! row locked, the change applied (a pure function), identities claimed and
//! released, the row written with its next version.

use std::collections::BTreeSet;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Pool, TxOpts};

use super::model::{self, Change, Conflict, Effect, Identity, Member};
use super::shards::{MapError, Place, Range, ShardMap};

/// Databases and table pairs per database of a new store's first layout.
const INITIAL_DATABASES: u32 = 4;
const INITIAL_TABLES: u32 = 4;

/// MySQL's "duplicate entry" error.
const DUPLICATE_KEY: u16 = 1062;

/// Why a MySQL call about members failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The server failed or could not be reached.
    #[error("MySQL: {0}")]
    Mysql(#[from] mysql_async::Error),
    /// The shard map is unusable.
    #[error(transparent)]
    Map(#[from] MapError),
    /// A stored row could not be read.
    #[error("member {id}: stored row unreadable: {reason}")]
    Decode {
        /// The member.
        id: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Why a write was not made.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The change conflicts with the stored state.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The store failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<mysql_async::Error> for WriteError {
    fn from(e: mysql_async::Error) -> Self {
        Self::Db(DbError::Mysql(e))
    }
}

/// A committed write.
#[derive(Clone, Debug)]
pub struct Written {
    /// What it did.
    pub effect: Effect,
    /// The GTID of its transaction (absent when it changed nothing): a
    /// replica that has applied it has the write.
    pub gtid: Option<String>,
}

/// The members of one store in one MySQL server.
#[derive(Clone, Debug)]
pub struct MemberDb {
    pool: Pool,
    map: ShardMap,
}

type Row = (String, String, String, u64, i64);

impl MemberDb {
    /// The store whose home database is `home` on the primary `pool`: the
    /// shard map is read, or made with the first layout if there is none,
    /// and every place's tables are created if missing. Idempotent.
    pub async fn install(pool: Pool, home: &str, logical: u32) -> Result<Self, DbError> {
        let mut conn = pool.get_conn().await?;
        let map_table = format!("`{home}`.`member_shards`");
        let initial = ShardMap::initial(home, logical, INITIAL_DATABASES, INITIAL_TABLES)?;
        conn.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {map_table} (first_shard INT UNSIGNED PRIMARY KEY, \
             last_shard INT UNSIGNED NOT NULL, database_name VARCHAR(64) NOT NULL, \
             table_number INT UNSIGNED NOT NULL)"
        ))
        .await?;
        // Two installers at once both insert the same first layout: IGNORE keeps one.
        let rows: Vec<(u32, u32, String, u32)> = initial
            .ranges()
            .iter()
            .map(|r| (r.first, r.last, r.place.database.clone(), r.place.table))
            .collect();
        let existing: Option<u32> = conn
            .query_first(format!("SELECT COUNT(*) FROM {map_table}"))
            .await?;
        if existing == Some(0) {
            conn.exec_batch(
                format!(
                    "INSERT IGNORE INTO {map_table} (first_shard, last_shard, database_name, table_number) \
                     VALUES (?, ?, ?, ?)"
                ),
                rows,
            )
            .await?;
        }
        let map = Self::read_map(&mut conn, &map_table, logical).await?;
        for place in map.places() {
            Self::create_place(&mut conn, place).await?;
        }
        Ok(Self { pool, map })
    }

    /// The store on a replica `pool` whose primary has installed it: only
    /// the shard map is read.
    pub async fn replica(pool: Pool, home: &str, logical: u32) -> Result<Self, DbError> {
        let mut conn = pool.get_conn().await?;
        let map = Self::read_map(&mut conn, &format!("`{home}`.`member_shards`"), logical).await?;
        Ok(Self { pool, map })
    }

    async fn read_map(conn: &mut mysql_async::Conn, table: &str, logical: u32) -> Result<ShardMap, DbError> {
        let rows: Vec<(u32, u32, String, u32)> = conn
            .query(format!(
                "SELECT first_shard, last_shard, database_name, table_number FROM {table}"
            ))
            .await?;
        let ranges = rows
            .into_iter()
            .map(|(first, last, database, table)| Range {
                first,
                last,
                place: Place { database, table },
            })
            .collect();
        Ok(ShardMap::new(logical, ranges)?)
    }

    async fn create_place(conn: &mut mysql_async::Conn, place: &Place) -> Result<(), DbError> {
        conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS `{}`", place.database))
            .await?;
        conn.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {} (member_id BIGINT UNSIGNED PRIMARY KEY, \
             name VARCHAR(64) NOT NULL, level VARCHAR(32) NOT NULL, identities TEXT NOT NULL, \
             version BIGINT UNSIGNED NOT NULL, updated_ms BIGINT NOT NULL) \
             DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
            place.members()
        ))
        .await?;
        conn.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {} (kind TINYINT UNSIGNED NOT NULL, \
             value VARCHAR(64) NOT NULL, member_id BIGINT UNSIGNED NOT NULL, \
             PRIMARY KEY (kind, value)) DEFAULT CHARSET = ascii COLLATE = ascii_bin",
            place.identities()
        ))
        .await?;
        Ok(())
    }

    /// The shard map in force.
    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// Member `id`, if it exists.
    pub async fn get(&self, id: u64) -> Result<Option<Member>, DbError> {
        let mut conn = self.pool.get_conn().await?;
        let row: Option<Row> = conn
            .exec_first(
                format!(
                    "SELECT name, level, identities, version, updated_ms FROM {} WHERE member_id = ?",
                    self.map.member_place(id).members()
                ),
                (id,),
            )
            .await?;
        row.map(|r| decode(id, r)).transpose()
    }

    /// The member `identity` is bound to, if any.
    pub async fn owner(&self, identity: &Identity) -> Result<Option<u64>, DbError> {
        let mut conn = self.pool.get_conn().await?;
        Ok(conn
            .exec_first(
                format!(
                    "SELECT member_id FROM {} WHERE kind = ? AND value = ?",
                    self.map.identity_place(identity).identities()
                ),
                (identity.kind.code(), &identity.value),
            )
            .await?)
    }

    /// Makes `change` to member `id` at `now_ms`, in one transaction.
    pub async fn write(&self, id: u64, change: &Change, now_ms: i64) -> Result<Written, WriteError> {
        let mut conn = self.pool.get_conn().await?;
        let place = self.map.member_place(id);
        let mut tx = conn.start_transaction(TxOpts::default()).await?;
        let current = locked(&mut tx, place, id).await?;
        let effect = model::apply(current.as_ref(), id, change, now_ms)?;
        if !effect.changed() {
            tx.rollback().await?;
            return Ok(Written { effect, gtid: None });
        }
        for identity in &effect.claimed {
            let claim = tx
                .exec_drop(
                    format!(
                        "INSERT INTO {} (kind, value, member_id) VALUES (?, ?, ?)",
                        self.map.identity_place(identity).identities()
                    ),
                    (identity.kind.code(), &identity.value, id),
                )
                .await;
            if let Err(error) = claim {
                if !duplicate(&error) {
                    return Err(error.into());
                }
                let owner: Option<u64> = tx
                    .exec_first(
                        format!(
                            "SELECT member_id FROM {} WHERE kind = ? AND value = ?",
                            self.map.identity_place(identity).identities()
                        ),
                        (identity.kind.code(), &identity.value),
                    )
                    .await?;
                // The transaction is dropped, which rolls it back.
                return Err(Conflict::BoundElsewhere {
                    identity: identity.clone(),
                    owner: owner.unwrap_or_default(),
                }
                .into());
            }
        }
        for identity in &effect.released {
            tx.exec_drop(
                format!(
                    "DELETE FROM {} WHERE kind = ? AND value = ? AND member_id = ?",
                    self.map.identity_place(identity).identities()
                ),
                (identity.kind.code(), &identity.value, id),
            )
            .await?;
        }
        let m = &effect.after;
        let identities = encode_identities(&m.identities);
        if effect.before.is_none() {
            let inserted = tx
                .exec_drop(
                    format!(
                        "INSERT INTO {} (member_id, name, level, identities, version, updated_ms) \
                         VALUES (?, ?, ?, ?, ?, ?)",
                        place.members()
                    ),
                    (id, &m.name, &m.level, identities, m.version, m.updated_ms),
                )
                .await;
            match inserted {
                Err(error) if duplicate(&error) => return Err(Conflict::IdTaken(id).into()),
                other => other?,
            }
        } else {
            tx.exec_drop(
                format!(
                    "UPDATE {} SET name = ?, level = ?, identities = ?, version = ?, updated_ms = ? \
                     WHERE member_id = ?",
                    place.members()
                ),
                (&m.name, &m.level, identities, m.version, m.updated_ms, id),
            )
            .await?;
        }
        tx.commit().await?;
        let gtid: Option<String> = conn.query_first("SELECT @@last_gtid").await?;
        Ok(Written {
            effect,
            gtid: gtid.filter(|g| !g.is_empty()),
        })
    }

    /// Brings member `m` to the state `m` (a replayed write), unless the
    /// row is already at its version or newer. Of its identities, those in
    /// `held` (the ones Elasticsearch's claims, which decided while MySQL
    /// was down, give it now) are claimed for it whoever held them in MySQL;
    /// the others are not: records of two members can reach the journal in
    /// another order than their claims were made, and an older record of a
    /// former holder must not take back what was since claimed by another.
    pub async fn put_state(&self, m: &Member, held: &BTreeSet<Identity>) -> Result<bool, DbError> {
        let mut conn = self.pool.get_conn().await?;
        let place = self.map.member_place(m.id);
        let mut tx = conn.start_transaction(TxOpts::default()).await?;
        let current = locked(&mut tx, place, m.id).await?;
        if current.as_ref().is_some_and(|c| c.version >= m.version) {
            tx.rollback().await?;
            return Ok(false);
        }
        let before = current.map(|c| c.identities).unwrap_or_default();
        for released in before.difference(&m.identities) {
            tx.exec_drop(
                format!(
                    "DELETE FROM {} WHERE kind = ? AND value = ? AND member_id = ?",
                    self.map.identity_place(released).identities()
                ),
                (released.kind.code(), &released.value, m.id),
            )
            .await?;
        }
        for claimed in m.identities.intersection(held) {
            tx.exec_drop(
                format!(
                    "INSERT INTO {} (kind, value, member_id) VALUES (?, ?, ?) \
                     ON DUPLICATE KEY UPDATE member_id = VALUES(member_id)",
                    self.map.identity_place(claimed).identities()
                ),
                (claimed.kind.code(), &claimed.value, m.id),
            )
            .await?;
        }
        tx.exec_drop(
            format!(
                "INSERT INTO {} (member_id, name, level, identities, version, updated_ms) \
                 VALUES (?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE name = VALUES(name), \
                 level = VALUES(level), identities = VALUES(identities), \
                 version = VALUES(version), updated_ms = VALUES(updated_ms)",
                place.members()
            ),
            (
                m.id,
                &m.name,
                &m.level,
                encode_identities(&m.identities),
                m.version,
                m.updated_ms,
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Whether the server answers (a trial call for an open breaker).
    pub async fn ping(&self) -> Result<(), DbError> {
        let mut conn = self.pool.get_conn().await?;
        conn.query_drop("SELECT 1").await?;
        Ok(())
    }

    /// Waits up to `timeout` for this server (a replica) to have applied
    /// `gtid`; whether it has.
    pub async fn caught_up(&self, gtid: &str, timeout: Duration) -> Result<bool, DbError> {
        let mut conn = self.pool.get_conn().await?;
        let waited: Option<i64> = conn
            .exec_first("SELECT MASTER_GTID_WAIT(?, ?)", (gtid, timeout.as_secs_f64()))
            .await?;
        Ok(waited == Some(0))
    }
}

/// Member `id`'s row at `place`, locked until `tx` ends.
async fn locked(
    tx: &mut mysql_async::Transaction<'_>,
    place: &Place,
    id: u64,
) -> Result<Option<Member>, DbError> {
    let row: Option<Row> = tx
        .exec_first(
            format!(
                "SELECT name, level, identities, version, updated_ms FROM {} WHERE member_id = ? FOR UPDATE",
                place.members()
            ),
            (id,),
        )
        .await?;
    row.map(|r| decode(id, r)).transpose()
}

fn duplicate(error: &mysql_async::Error) -> bool {
    matches!(error, mysql_async::Error::Server(e) if e.code == DUPLICATE_KEY)
}

/// The identities column: JSON, as the member documents hold them. Pure.
pub fn encode_identities(identities: &std::collections::BTreeSet<Identity>) -> String {
    serde_json::to_string(identities).unwrap_or_else(|_| "[]".into())
}

fn decode(id: u64, (name, level, identities, version, updated_ms): Row) -> Result<Member, DbError> {
    let identities = serde_json::from_str(&identities).map_err(|e| DbError::Decode {
        id,
        reason: e.to_string(),
    })?;
    Ok(Member {
        id,
        name,
        level,
        identities,
        version,
        updated_ms,
    })
}

/// A GTID as `MASTER_GTID_WAIT` takes it: `domain-server-sequence`, digits
/// only, so that a caller's token cannot be anything else. Pure.
pub fn valid_gtid(token: &str) -> bool {
    let parts: Vec<&str> = token.split('-').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::model::IdentityKind;

    #[test]
    fn only_a_well_formed_gtid_is_waited_for() {
        for good in ["0-3-17", "1-2-18446744073709551615"] {
            assert!(valid_gtid(good), "{good}");
        }
        for bad in ["", "0-3", "0-3-x", "0-3-1,0-4-2", "0-3-1'; SELECT 1", "--"] {
            assert!(!valid_gtid(bad), "{bad}");
        }
    }

    #[test]
    fn identities_round_trip_through_their_column() {
        let identities = [
            Identity::parse(IdentityKind::Phone, "13812345678"),
            Identity::parse(IdentityKind::ElongCard, "123456"),
        ]
        .into_iter()
        .collect::<Result<std::collections::BTreeSet<_>, _>>()
        .unwrap_or_default();
        let text = encode_identities(&identities);
        let row = ("n".to_owned(), "l".to_owned(), text, 2, 5);
        let member = decode(9, row).map_err(|e| e.to_string());
        assert_eq!(member.map(|m| m.identities), Ok(identities));
        assert!(decode(9, ("n".into(), "l".into(), "{".into(), 1, 1)).is_err());
    }
}
