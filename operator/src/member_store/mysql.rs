//! The member MySQL's failover at the edge: reads each answering server
//! through the admin account (read-only flag, GTID positions, replication
//! source), brings the servers to the published topology (opens the master,
//! fences and re-points the demoted one by GTID), measures each replica's
//! lag ([`super::mysql_topology`]), and carries out what
//! [`super::mysql_failover::decide`] decides: a
//! promotion is published first and the new master opened after (a new
//! leader finishes either), a switch back fences the master and waits for
//! the primary to apply everything before it is published. Every call has a
//! deadline; no password reaches a log or an error.

use std::collections::BTreeMap;
use std::time::Duration;

use ballast_crds::conditions::{self, Desired};
use ballast_crds::member_store::{MysqlReplica, PROMOTE_MYSQL_ANNOTATION};
use ballast_crds::{DependencyStatus, MemberStore, Mode};
use ballast_node::connect::host_port;
use ballast_node::probe::scrub;
use ballast_node::secret::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row};

use super::Watched;
use super::mysql_failover::{self, Facts};
use super::mysql_topology::{self, Observed, Repair, Source};
use super::promotion::Decision;
use crate::context::Context;

/// Deadline of each connection and statement.
const DEADLINE: Duration = Duration::from_secs(2);

/// Longest a promoted or switched-to server may take to apply what it received.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// The admin account, with its password.
#[derive(Clone, Debug)]
pub struct Admin {
    /// User to connect as.
    pub user: String,
    /// Its password, if it has one.
    pub password: Option<Secret>,
}

/// Why a call to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum MysqlError {
    /// The server refused the connection or a statement.
    #[error("mysql {address}: {message}")]
    Refused {
        /// The server's `host:port`.
        address: String,
        /// What it said, without the password.
        message: String,
    },
    /// It did not answer within the deadline.
    #[error("mysql {address}: no answer within {} ms", DEADLINE.as_millis())]
    TimedOut {
        /// The server's `host:port`.
        address: String,
    },
    /// It did not apply what it received within [`APPLY_WAIT`].
    #[error("mysql {address} did not apply {position} within {} s", APPLY_WAIT.as_secs())]
    Behind {
        /// The server's `host:port`.
        address: String,
        /// The position waited for.
        position: String,
    },
}

/// One server, through the admin account.
struct Server<'a> {
    address: &'a str,
    admin: &'a Admin,
}

impl Server<'_> {
    fn refused(&self, error: &mysql_async::Error) -> MysqlError {
        MysqlError::Refused {
            address: self.address.to_owned(),
            message: scrub(&error.to_string(), self.admin.password.as_ref()),
        }
    }

    async fn within<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = Result<T, mysql_async::Error>>,
    ) -> Result<T, MysqlError> {
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => Err(self.refused(&error)),
            Err(_) => Err(MysqlError::TimedOut {
                address: self.address.to_owned(),
            }),
        }
    }

    async fn connect(&self) -> Result<Conn, MysqlError> {
        let (host, port) = host_port(self.address, 3306);
        let opts = OptsBuilder::default()
            .ip_or_hostname(host)
            .tcp_port(port)
            .user(Some(self.admin.user.clone()))
            .pass(self.admin.password.as_ref().map(Secret::expose));
        self.within(DEADLINE, Conn::new(opts)).await
    }

    async fn run(&self, conn: &mut Conn, sql: &str) -> Result<(), MysqlError> {
        self.within(DEADLINE, conn.query_drop(sql)).await
    }

    /// What the server is now.
    async fn observe(&self) -> Result<Observed, MysqlError> {
        let mut conn = self.connect().await?;
        let vars: Option<(i64, String, String)> = self
            .within(
                DEADLINE,
                conn.query_first("SELECT @@read_only, @@gtid_binlog_pos, @@gtid_current_pos"),
            )
            .await?;
        let (read_only, binlog, current) = vars.unwrap_or_default();
        let status: Option<Row> = self
            .within(DEADLINE, conn.query_first("SHOW SLAVE STATUS"))
            .await?;
        let source = status.map(|row| {
            let text = |column: &str| -> String {
                row.get_opt::<Option<String>, _>(column)
                    .and_then(Result::ok)
                    .flatten()
                    .unwrap_or_default()
            };
            Source {
                address: format!("{}:{}", text("Master_Host"), text("Master_Port")),
                io_running: text("Slave_IO_Running") == "Yes",
                sql_running: text("Slave_SQL_Running") == "Yes",
                seconds_behind: text("Seconds_Behind_Master").parse().ok(),
                received: text("Gtid_IO_Pos"),
                last_error: [text("Last_IO_Error"), text("Last_SQL_Error")]
                    .into_iter()
                    .filter(|e| !e.is_empty())
                    .collect::<Vec<_>>()
                    .join("; "),
            }
        });
        let _ = conn.disconnect().await;
        Ok(Observed {
            read_only: read_only != 0,
            binlog,
            current,
            source,
        })
    }

    /// Waits until the server has applied `position`.
    async fn apply(&self, conn: &mut Conn, position: &str) -> Result<(), MysqlError> {
        let waited: Option<i64> = self
            .within(
                APPLY_WAIT + DEADLINE,
                conn.exec_first(
                    "SELECT MASTER_GTID_WAIT(?, ?)",
                    (position, APPLY_WAIT.as_secs_f64()),
                ),
            )
            .await?;
        if waited == Some(0) {
            Ok(())
        } else {
            Err(MysqlError::Behind {
                address: self.address.to_owned(),
                position: position.to_owned(),
            })
        }
    }

    /// Stops its replication once it has applied what it received, and opens it for writes.
    async fn open(&self, observed: &Observed) -> Result<(), MysqlError> {
        let mut conn = self.connect().await?;
        if let Some(source) = &observed.source {
            self.run(&mut conn, "STOP SLAVE IO_THREAD").await?;
            if source.sql_running && !source.received.is_empty() {
                self.apply(&mut conn, &source.received).await?;
            }
            self.run(&mut conn, "STOP SLAVE").await?;
            self.run(&mut conn, "RESET SLAVE ALL").await?;
        }
        self.run(&mut conn, "SET GLOBAL read_only = 1").await?;
        self.run(&mut conn, "SET GLOBAL read_only = 0").await?;
        let _ = conn.disconnect().await;
        Ok(())
    }

    /// Sets `read_only`: the member service's user can no longer write it.
    async fn freeze(&self) -> Result<(), MysqlError> {
        let mut conn = self.connect().await?;
        self.run(&mut conn, "SET GLOBAL read_only = 1").await?;
        let _ = conn.disconnect().await;
        Ok(())
    }

    /// Fences it (`read_only`) and makes it a replica of `master`, from its
    /// own GTID position: a server that has what the master lacks stops
    /// replicating on the error, which the status reports.
    async fn fence(&self, master: &str) -> Result<(), MysqlError> {
        let (host, port) = host_port(master, 3306);
        let mut conn = self.connect().await?;
        self.run(&mut conn, "SET GLOBAL read_only = 1").await?;
        self.run(&mut conn, "STOP SLAVE").await?;
        let password = self.admin.password.as_ref().map_or("", Secret::expose);
        // CHANGE MASTER takes no placeholders: the values are quoted here.
        let change = format!(
            "CHANGE MASTER TO MASTER_HOST = {}, MASTER_PORT = {port}, MASTER_USER = {}, MASTER_PASSWORD = {}, \
             MASTER_USE_GTID = current_pos, MASTER_CONNECT_RETRY = 1",
            quoted(&host),
            quoted(&self.admin.user),
            quoted(password),
        );
        self.run(&mut conn, &change).await?;
        self.run(&mut conn, "START SLAVE").await?;
        let _ = conn.disconnect().await;
        Ok(())
    }

    /// Its binlog position, read on a new connection.
    async fn binlog(&self) -> Result<String, MysqlError> {
        Ok(self.observe().await?.binlog)
    }

    /// Waits until it has applied `position`, on a new connection.
    async fn caught_up(&self, position: &str) -> Result<(), MysqlError> {
        let mut conn = self.connect().await?;
        self.apply(&mut conn, position).await?;
        let _ = conn.disconnect().await;
        Ok(())
    }
}

/// `text` as a MariaDB string literal (backslash escapes on, as by default).
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// What the MySQL part of a reconcile decided and did.
#[derive(Debug)]
pub struct Outcome {
    /// The master to publish.
    pub master: String,
    /// The demoted data centre still to fence.
    pub demoted: Option<String>,
    /// Each replica's replication.
    pub replication: Vec<MysqlReplica>,
    /// The master's mode, from its probes.
    pub mode: Option<DependencyStatus>,
    /// The `MysqlMasterAvailable` condition.
    pub condition: Desired,
    /// Whether the master changed (the epoch rises).
    pub changed: bool,
    /// Events to publish: (warning, reason, message).
    pub events: Vec<(bool, &'static str, String)>,
    /// Whether the new master is still to be opened: look again soon.
    pub hurry: bool,
}

/// The address of data centre `dc`'s MySQL.
fn address<'a>(ms: &'a MemberStore, dc: &str) -> Option<&'a str> {
    ms.spec
        .data_centers
        .iter()
        .find(|d| d.name == dc)
        .map(|d| d.mysql.address.as_str())
}

/// The MySQL part of a reconcile of `ms`; `leading` now or not.
pub async fn reconcile(
    ctx: &Context,
    key: &ObjectRef<MemberStore>,
    ms: &MemberStore,
    admin: Option<&Admin>,
    leading: bool,
) -> Outcome {
    let status = ms.status.clone().unwrap_or_default();
    let primary = ms.spec.primary.as_str();
    let mut master = ms.mysql_master().to_owned();
    let mut demoted = status.mysql_demoted.clone();
    let up: BTreeMap<String, bool> = {
        let stores = ctx.stores();
        ms.spec
            .data_centers
            .iter()
            .filter_map(|dc| {
                let machine = stores
                    .get(key)?
                    .machines
                    .get(&(Watched::Mysql, dc.name.clone()))?;
                Some((dc.name.clone(), machine.mode != Mode::Degraded))
            })
            .collect()
    };
    let mut events = Vec::new();

    // Read every answering server.
    let mut observed: BTreeMap<String, Observed> = BTreeMap::new();
    if let Some(admin) = admin {
        for dc in &ms.spec.data_centers {
            if up.get(&dc.name) != Some(&true) {
                continue;
            }
            let server = Server {
                address: &dc.mysql.address,
                admin,
            };
            match server.observe().await {
                Ok(o) => {
                    observed.insert(dc.name.clone(), o);
                }
                Err(error) => tracing::warn!(dc = %dc.name, %error, "reading a member MySQL server failed"),
            }
        }
    }

    // Bring the servers to the published topology.
    let master_address = address(ms, &master).unwrap_or_default().to_owned();
    let mut hurry = false;
    if leading && let Some(admin) = admin {
        let plan = mysql_topology::repairs(
            (&master, observed.get(&master)),
            &master_address,
            demoted.as_deref().map(|d| (d, observed.get(d))),
        );
        for repair in plan {
            match repair {
                Repair::Open(dc) => {
                    let server = Server {
                        address: &master_address,
                        admin,
                    };
                    let Some(seen) = observed.get(&dc) else { continue };
                    match server.open(seen).await {
                        Ok(()) => {
                            tracing::warn!(%dc, "the MySQL master was opened for writes");
                            events.push((
                                false,
                                "MysqlOpened",
                                format!("{dc}'s MySQL master was opened for writes"),
                            ));
                        }
                        Err(error) => {
                            tracing::warn!(%dc, %error, "opening the MySQL master failed; retrying");
                            hurry = true;
                        }
                    }
                }
                Repair::Fence(dc) => {
                    let Some(at) = address(ms, &dc) else { continue };
                    match (Server { address: at, admin }).fence(&master_address).await {
                        Ok(()) => {
                            tracing::warn!(%dc, %master, "the demoted MySQL was fenced and re-pointed");
                            events.push((
                                true,
                                "MysqlFenced",
                                format!(
                                    "{dc}'s MySQL was set read_only and re-pointed at {master}'s by GTID"
                                ),
                            ));
                        }
                        Err(error) => {
                            tracing::warn!(%dc, %error, "fencing the demoted MySQL failed; retrying")
                        }
                    }
                }
                Repair::Fenced(dc) => {
                    tracing::info!(%dc, %master, "the demoted MySQL replicates from the master");
                    demoted = None;
                }
            }
        }
    }

    // Each replica's lag, while the master is read.
    let now = Timestamp::now();
    let replication: Vec<MysqlReplica> = ms
        .spec
        .data_centers
        .iter()
        .filter(|dc| dc.name != master)
        .filter_map(|dc| match (observed.get(&master), observed.get(&dc.name)) {
            (Some(m), Some(r)) => Some(mysql_topology::measure(&dc.name, &master_address, m, r, now)),
            _ => status
                .mysql_replication
                .iter()
                .find(|r| r.data_center == dc.name)
                .cloned(),
        })
        .collect();

    let caught_up_for = {
        let mut stores = ctx.stores();
        let state = stores.entry(key.clone()).or_default();
        let caught_up = master != primary
            && replication
                .iter()
                .any(|r| r.data_center == primary && r.replicating && r.lag_transactions == 0);
        if caught_up {
            let since = *state
                .mysql_primary_caught_up_since
                .get_or_insert_with(tokio::time::Instant::now);
            Some(since.elapsed())
        } else {
            state.mysql_primary_caught_up_since = None;
            None
        }
    };
    let order: Vec<String> = ms.spec.data_centers.iter().map(|dc| dc.name.clone()).collect();
    let budget = &ms.spec.promotion;
    let facts = Facts {
        order: &order,
        primary,
        master: &master,
        up: &up,
        replication: &replication,
        max_lag_transactions: budget.max_lag_events,
        max_lag_seconds: i64::from(budget.max_lag_seconds),
        policy: budget.mysql,
        administered: admin.is_some(),
        leading,
        named: ms.annotations().get(PROMOTE_MYSQL_ANNOTATION).map(String::as_str),
        failback: ms.spec.failback,
        primary_caught_up_for: caught_up_for,
        dwell: Duration::from_secs(u64::try_from(budget.failback_dwell_seconds).unwrap_or(0)),
    };
    let decision = mysql_failover::decide(&facts);
    let announce = {
        let mut stores = ctx.stores();
        let state = stores.entry(key.clone()).or_default();
        state.mysql_last_reason.replace(decision.reason()) != Some(decision.reason())
    };
    let mut changed = false;
    let condition = match decision {
        Decision::Stay { reason, message } => {
            Desired::holds(conditions::MYSQL_MASTER_AVAILABLE, reason, message)
        }
        Decision::Wait { reason, message } => {
            if announce {
                tracing::warn!(reason, %message, "the MySQL master is down and is not replaced");
                events.push((true, reason, message.clone()));
            }
            Desired::fails(conditions::MYSQL_MASTER_AVAILABLE, reason, message)
        }
        // Away from a down master: published now, opened at the next reconcile.
        Decision::Promote { to, reason, message } if up.get(&master) != Some(&true) => {
            tracing::warn!(from = %master, %to, reason, %message, "MySQL master promoted");
            events.push((true, reason, message.clone()));
            demoted = Some(std::mem::replace(&mut master, to));
            changed = true;
            hurry = true;
            Desired::holds(conditions::MYSQL_MASTER_AVAILABLE, reason, message)
        }
        // Away from an answering master (the switch back): fenced first.
        Decision::Promote { to, reason, message } => match admin {
            Some(admin) => match switch_back(ms, admin, &master, &to).await {
                Ok(()) => {
                    tracing::warn!(from = %master, %to, %message, "MySQL master switched back");
                    events.push((false, reason, message.clone()));
                    demoted = Some(std::mem::replace(&mut master, to));
                    changed = true;
                    hurry = true;
                    Desired::holds(conditions::MYSQL_MASTER_AVAILABLE, reason, message)
                }
                Err(error) => {
                    tracing::warn!(%error, "the MySQL switch back failed; the master stays");
                    Desired::holds(
                        conditions::MYSQL_MASTER_AVAILABLE,
                        "SwitchBackFailed",
                        format!("{master} stays the MySQL master: the switch back to {to} failed: {error}"),
                    )
                }
            },
            None => Desired::holds(conditions::MYSQL_MASTER_AVAILABLE, "NoAdminAccount", message),
        },
    };
    let mode = {
        let stores = ctx.stores();
        let state = stores.get(key);
        state
            .and_then(|s| s.machines.get(&(Watched::Mysql, master.clone())))
            .map(|machine| DependencyStatus {
                mode: machine.mode,
                since: Time(machine.since),
                epoch: machine.epoch,
                forced: false,
                reason: state
                    .and_then(|s| s.reasons.get(&(Watched::Mysql, master.clone())))
                    .map(|r| (*r).to_owned()),
                message: None,
            })
    };
    Outcome {
        master,
        demoted,
        replication,
        mode,
        condition,
        changed,
        events,
        hurry,
    }
}

/// The planned switch back from `master` to `to`: fences the master, waits
/// until `to` has applied everything it wrote, and reopens the master if
/// that fails. Publishing `to` and opening it follow.
async fn switch_back(ms: &MemberStore, admin: &Admin, master: &str, to: &str) -> Result<(), MysqlError> {
    let (Some(from), Some(at)) = (address(ms, master), address(ms, to)) else {
        return Ok(());
    };
    let from = Server { address: from, admin };
    let to = Server { address: at, admin };
    from.freeze().await?;
    let waited = async {
        let position = from.binlog().await?;
        to.caught_up(&position).await
    }
    .await;
    if let Err(error) = waited {
        // Writes go on where they were.
        if let Err(reopen) = from.open(&Observed::default()).await {
            tracing::error!(%reopen, "reopening the MySQL master after a failed switch back failed");
        }
        return Err(error);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_value_cannot_end_its_literal() {
        let cases = [
            ("plain", "'plain'"),
            ("it's", "'it\\'s'"),
            ("back\\slash", "'back\\\\slash'"),
            ("\\'; DROP", "'\\\\\\'; DROP'"),
        ];
        for (text, want) in cases {
            assert_eq!(quoted(text), want, "{text}");
        }
    }
}
