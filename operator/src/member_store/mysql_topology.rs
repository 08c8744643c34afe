//! The member MySQL servers as the operator reads them through its admin
//! account (GTID positions, `read_only`, replication source), each
//! replica's lag from them, and what the servers must be made to match the
//! published topology: the master writable and replicating from nobody,
//! the demoted one `read_only` and replicating from the master. Pure.

use std::collections::BTreeMap;

use ballast_crds::member_store::MysqlReplica;

/// A server's GTID position: the highest sequence number per replication
/// domain, from MariaDB's `domain-server-seq` lists.
pub type Position = BTreeMap<u32, u64>;

/// Parses a MariaDB GTID list (`0-1-42,1-2-7`; empty for none). Pure.
pub fn position(list: &str) -> Result<Position, String> {
    let mut out = Position::new();
    for gtid in list.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        let parts: Vec<&str> = gtid.split('-').collect();
        let [domain, _server, seq] = parts.as_slice() else {
            return Err(format!("{gtid:?} is not a domain-server-sequence GTID"));
        };
        let domain: u32 = domain.parse().map_err(|_| format!("{gtid:?}: bad domain"))?;
        let seq: u64 = seq.parse().map_err(|_| format!("{gtid:?}: bad sequence"))?;
        let at = out.entry(domain).or_insert(0);
        *at = (*at).max(seq);
    }
    Ok(out)
}

/// Transactions of `master` that `replica` has not applied: in each domain,
/// how far its sequence is behind (a domain the replica is ahead in counts
/// nothing). Pure.
pub fn behind(master: &Position, replica: &Position) -> i64 {
    let missing: u64 = master
        .iter()
        .map(|(domain, seq)| seq.saturating_sub(replica.get(domain).copied().unwrap_or(0)))
        .sum();
    i64::try_from(missing).unwrap_or(i64::MAX)
}

/// A server's replication source, as `SHOW SLAVE STATUS` gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// The master it replicates from, `host:port`.
    pub address: String,
    /// Whether the IO thread runs (connected or connecting).
    pub io_running: bool,
    /// Whether the SQL thread runs.
    pub sql_running: bool,
    /// `Seconds_Behind_Master`.
    pub seconds_behind: Option<i64>,
    /// What the IO thread has received (`Gtid_IO_Pos`).
    pub received: String,
    /// The last error either thread stopped on.
    pub last_error: String,
}

/// What the operator read of one MySQL server through its admin account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `@@read_only`: the member service cannot write it.
    pub read_only: bool,
    /// `@@gtid_binlog_pos`: what it has written (as a master).
    pub binlog: String,
    /// `@@gtid_current_pos`: what it has applied, its own writes and replicated ones.
    pub current: String,
    /// Its replication source, if it is a replica.
    pub source: Option<Source>,
}

impl Observed {
    /// Whether it replicates from `master` with both threads running.
    pub fn replicates_from(&self, master: &str) -> bool {
        self.source
            .as_ref()
            .is_some_and(|s| s.address == master && s.io_running && s.sql_running)
    }
}

/// The replication of replica `dc` (`replica`) from `master` (at
/// `master_address`), measured at `now`. Pure.
pub fn measure(
    dc: &str,
    master_address: &str,
    master: &Observed,
    replica: &Observed,
    now: k8s_openapi::jiff::Timestamp,
) -> MysqlReplica {
    let lag = match (position(&master.binlog), position(&replica.current)) {
        (Ok(m), Ok(r)) => behind(&m, &r),
        // An unreadable position is no promise of anything.
        _ => i64::MAX,
    };
    MysqlReplica {
        data_center: dc.to_owned(),
        replicating: replica.replicates_from(master_address),
        lag_transactions: lag,
        lag_seconds: replica.source.as_ref().and_then(|s| s.seconds_behind),
        measured_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
    }
}

/// What a server must be made to match the published topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// The master is `read_only` or still replicating: stop its replication
    /// once it has applied what it received, and open it for writes.
    Open(String),
    /// The demoted one answers: fence it (`read_only`) and re-point it at the
    /// master by GTID.
    Fence(String),
    /// The demoted one is fenced and replicates from the master: it is no
    /// longer demoted.
    Fenced(String),
}

/// The repairs the servers need, from what was read of the `master` and of
/// the `demoted` one (each `None` if it was not read), the master's address. Pure.
pub fn repairs(
    master: (&str, Option<&Observed>),
    master_address: &str,
    demoted: Option<(&str, Option<&Observed>)>,
) -> Vec<Repair> {
    let mut out = Vec::new();
    if let (dc, Some(m)) = master
        && (m.read_only || m.source.is_some())
    {
        out.push(Repair::Open(dc.to_owned()));
    }
    if let Some((dc, Some(d))) = demoted {
        if d.read_only && d.replicates_from(master_address) {
            out.push(Repair::Fenced(dc.to_owned()));
        } else if d.source.as_ref().is_none_or(|s| s.address != master_address) || !d.read_only {
            out.push(Repair::Fence(dc.to_owned()));
        }
        // Fenced and pointed at the master, a thread still starting or
        // stopped on an error: the status says which, nothing is redone.
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gtid_list_is_read_per_domain_and_a_replica_is_behind_by_the_sequences_it_lacks() {
        let p = |s| position(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p(""), Position::new());
        assert_eq!(p("0-1-42"), [(0, 42)].into());
        assert_eq!(p("0-1-42, 1-2-7"), [(0, 42), (1, 7)].into());
        assert!(position("0-1").is_err());
        assert!(position("a-1-2").is_err());
        // (master, replica) → transactions behind
        let cases = [
            ("0-1-42", "0-1-42", 0),
            ("0-1-42", "0-1-40", 2),
            ("0-2-50", "0-1-42", 8),
            ("0-1-42", "", 42),
            ("0-1-42,1-1-5", "0-1-42", 5),
            // A replica ahead (an errant write) lacks nothing by count.
            ("0-1-40", "0-1-42", 0),
        ];
        for (master, replica, want) in cases {
            assert_eq!(behind(&p(master), &p(replica)), want, "{master} vs {replica}");
        }
    }

    fn server(read_only: bool, source: Option<(&str, bool)>) -> Observed {
        Observed {
            read_only,
            source: source.map(|(address, running)| Source {
                address: address.to_owned(),
                io_running: running,
                sql_running: running,
                ..Source::default()
            }),
            ..Observed::default()
        }
    }

    #[test]
    fn the_servers_are_brought_to_the_published_topology_and_no_further() {
        let at = "db-b:3306";
        let open = |dc: &str| Repair::Open(dc.to_owned());
        let fence = |dc: &str| Repair::Fence(dc.to_owned());
        let fenced = |dc: &str| Repair::Fenced(dc.to_owned());
        // (master as read, demoted as read) → repairs
        let cases = [
            (Some(server(false, None)), None, vec![]),
            (Some(server(true, None)), None, vec![open("dc-b")]),
            (
                Some(server(false, Some(("db-a:3306", false)))),
                None,
                vec![open("dc-b")],
            ),
            (None, None, vec![]),
            (
                Some(server(false, None)),
                Some(server(false, None)),
                vec![fence("dc-a")],
            ),
            (
                Some(server(false, None)),
                Some(server(true, None)),
                vec![fence("dc-a")],
            ),
            (
                Some(server(false, None)),
                Some(server(true, Some(("db-c:3306", true)))),
                vec![fence("dc-a")],
            ),
            (
                Some(server(false, None)),
                Some(server(true, Some((at, true)))),
                vec![fenced("dc-a")],
            ),
            // Pointed at the master and fenced, a thread stopped: reported, not redone.
            (
                Some(server(false, None)),
                Some(server(true, Some((at, false)))),
                vec![],
            ),
            (
                Some(server(true, None)),
                Some(server(false, None)),
                vec![open("dc-b"), fence("dc-a")],
            ),
        ];
        for (master, demoted, want) in cases {
            let got = repairs(("dc-b", master.as_ref()), at, Some(("dc-a", demoted.as_ref())));
            assert_eq!(got, want, "{master:?} {demoted:?}");
        }
        assert_eq!(repairs(("dc-a", Some(&server(false, None))), at, None), vec![]);
    }
}
