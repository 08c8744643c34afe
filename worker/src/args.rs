//! The command-line arguments of the roles beyond the pod's own (part of the
//! `ballast-worker` binary, not of the library): what each role reads with,
//! its timings, and its credentials, which clap reads into [`Secret`]s.

use std::net::SocketAddr;
use std::time::Duration;

use ballast_worker::probe::{Endpoint, Kind};
use ballast_worker::secret::Secret;
use clap::Args;

/// The server `ballast-worker probe` checks, in typed parts: the password
/// travels apart from the address (from the environment, never the command
/// line's output).
#[derive(Debug, Args)]
pub(crate) struct ProbeTarget {
    /// Which kind of server it is.
    pub(crate) kind: Kind,
    /// Its address: `host:port` (Kafka: a comma-separated list; Elasticsearch: its URL).
    pub(crate) address: String,
    /// User to connect as (MySQL; Elasticsearch with security).
    #[arg(long)]
    pub(crate) user: Option<String>,
    /// The MySQL database, or the Redis database number (default 0).
    #[arg(long)]
    pub(crate) database: Option<String>,
    /// Password of the user, or Redis's `AUTH` password.
    #[arg(long, env = "BALLAST_PROBE_PASSWORD", hide_env_values = true)]
    pub(crate) password: Option<Secret>,
}

impl ProbeTarget {
    /// The endpoint these parts name, or what is missing or wrong. Pure.
    pub(crate) fn endpoint(&self) -> Result<Endpoint, String> {
        let password = self.password.clone();
        Ok(match self.kind {
            Kind::Kafka => Endpoint::Kafka(self.address.clone()),
            Kind::Redis => Endpoint::Redis {
                address: self.address.clone(),
                database: match &self.database {
                    Some(db) => db.parse().ok().filter(|n| (0..=15).contains(n)).ok_or_else(|| {
                        format!("--database {db:?} is not a Redis database number (0 to 15)")
                    })?,
                    None => 0,
                },
                password,
            },
            Kind::Mysql => Endpoint::Mysql {
                address: self.address.clone(),
                user: self.user.clone().ok_or("a MySQL probe needs --user")?,
                database: self.database.clone().ok_or("a MySQL probe needs --database")?,
                password,
            },
            Kind::Elasticsearch => Endpoint::Elasticsearch {
                url: self.address.clone(),
                credentials: match (&self.user, password) {
                    (Some(user), Some(password)) => Some((user.clone(), password)),
                    (Some(_), None) => return Err("--user needs a password (BALLAST_PROBE_PASSWORD)".into()),
                    (None, _) => None,
                },
            },
        })
    }
}

/// Passwords of the stores a slave reads and writes (from the pipeline's Secrets).
#[derive(Debug, Args)]
pub(crate) struct StorePasswords {
    /// Password of the KV Redis.
    #[arg(long, env = "BALLAST_KV_PASSWORD", hide_env_values = true)]
    pub(crate) kv_password: Option<Secret>,
    /// Password of the cache Redis.
    #[arg(long, env = "BALLAST_CACHE_PASSWORD", hide_env_values = true)]
    pub(crate) cache_password: Option<Secret>,
    /// Password of the hot MySQL user.
    #[arg(long, env = "BALLAST_HOT_MYSQL_PASSWORD", hide_env_values = true)]
    pub(crate) hot_password: Option<Secret>,
}

/// How a slave computes.
#[derive(Args, Debug)]
pub(crate) struct ComputeArgs {
    /// Compute tasks run at once.
    #[arg(long, env = "BALLAST_COMPUTE_SLOTS", default_value_t = 2)]
    pub(crate) slots: u32,
    /// Bytes the SQL's operators may hold between them (default: half the pod's memory limit).
    #[arg(long, env = "BALLAST_COMPUTE_MEMORY_BYTES")]
    pub(crate) memory_bytes: Option<u64>,
    /// The container's memory limit, in bytes (the operator passes it from the downward API).
    #[arg(long, env = "BALLAST_MEMORY_LIMIT_BYTES")]
    pub(crate) pod_memory_limit: Option<u64>,
}

/// Settings of the master subcommand beyond the pod's.
#[derive(Debug, Args)]
pub(crate) struct MasterArgs {
    /// How long after its end a window is computed (late events land first).
    #[arg(long, env = "BALLAST_WINDOW_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub(crate) grace: Duration,
    /// Events per task: larger windows are split by merchant partition.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) events_per_task: u64,
    /// Tasks in flight per slave.
    #[arg(long, default_value_t = 4)]
    pub(crate) in_flight_per_slave: usize,
    /// How long after closing a window late events still get it computed again.
    #[arg(long, env = "BALLAST_LATENESS", default_value = "120s", value_parser = parse_duration)]
    pub(crate) lateness: Duration,
    /// Least window time between two computations of the hour (period) or
    /// the day to date, each of which reads the whole span so far; the one
    /// that completes a span always runs.
    #[arg(long, env = "BALLAST_TO_DATE_EVERY", default_value = "60s", value_parser = parse_duration)]
    pub(crate) to_date_every: Duration,
    /// A task is hung after running this long and ten times its estimate.
    #[arg(long, env = "BALLAST_HUNG_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub(crate) hung_after: Duration,
    /// First back-off of the delay queue (doubling up to 5 minutes).
    #[arg(long, env = "BALLAST_DELAY_BASE", default_value = "10s", value_parser = parse_duration)]
    pub(crate) delay_base: Duration,
    /// Password of the KV Redis (from the pipeline's Secret).
    #[arg(long, env = "BALLAST_KV_PASSWORD", hide_env_values = true)]
    pub(crate) kv_password: Option<Secret>,
}

/// How the query service reads.
#[derive(Debug, Args)]
pub(crate) struct QueryArgs {
    /// Deadline of each call to the cache or the hot MySQL.
    #[arg(long, env = "BALLAST_STORE_DEADLINE", default_value = "250ms", value_parser = parse_duration)]
    pub(crate) store_deadline: Duration,
    /// How long after closing a window late events may still change it (the master's lateness).
    #[arg(long, env = "BALLAST_LATENESS", default_value = "120s", value_parser = parse_duration)]
    pub(crate) lateness: Duration,
    /// Password of the cache Redis.
    #[arg(long, env = "BALLAST_CACHE_PASSWORD", hide_env_values = true)]
    pub(crate) cache_password: Option<Secret>,
    /// Password of the hot MySQL user.
    #[arg(long, env = "BALLAST_HOT_MYSQL_PASSWORD", hide_env_values = true)]
    pub(crate) hot_password: Option<Secret>,
    /// Deadline of each call to the cold store.
    #[arg(long, env = "BALLAST_COLD_DEADLINE", default_value = "1s", value_parser = parse_duration)]
    pub(crate) cold_deadline: Duration,
    /// How often today's precomputed cold answers are loaded (from the hot MySQL).
    #[arg(long, env = "BALLAST_PRECOMPUTED_EVERY", default_value = "60s", value_parser = parse_duration)]
    pub(crate) precomputed_every: Duration,
    /// User of the cold store (Elasticsearch), from the pipeline's credentials Secret.
    #[arg(long, env = "BALLAST_COLD_USERNAME", hide_env_values = true)]
    pub(crate) cold_username: Option<String>,
    /// Password of the cold store's user.
    #[arg(long, env = "BALLAST_COLD_PASSWORD", hide_env_values = true)]
    pub(crate) cold_password: Option<Secret>,
}

/// Which MemberStore a replicator keeps the clusters of, and what it reads with.
#[derive(Debug, Args)]
pub(crate) struct ReplicatorArgs {
    /// The MemberStore whose change stream it applies.
    #[arg(long, env = "BALLAST_MEMBER_STORE")]
    pub(crate) store: String,
    /// Namespace of the MemberStore.
    #[arg(long, env = "BALLAST_MEMBER_STORE_NAMESPACE")]
    pub(crate) store_namespace: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (port 0 picks one).
    #[arg(long, env = "BALLAST_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub(crate) metrics_addr: SocketAddr,
    /// Deadline of each call to a cluster or to Kafka.
    #[arg(long, env = "BALLAST_STORE_DEADLINE", default_value = "2s", value_parser = parse_duration)]
    pub(crate) store_deadline: Duration,
    /// How long draining may take on shutdown.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) drain: Duration,
    /// User of the member Elasticsearch clusters.
    #[arg(long, env = "BALLAST_MEMBER_ES_USERNAME", hide_env_values = true)]
    pub(crate) es_username: Option<String>,
    /// Password of the member Elasticsearch clusters' user.
    #[arg(long, env = "BALLAST_MEMBER_ES_PASSWORD", hide_env_values = true)]
    pub(crate) es_password: Option<Secret>,
}

/// Who a member process is and what it reads with.
#[derive(Debug, Args)]
pub(crate) struct MemberArgs {
    /// The MemberStore it serves.
    #[arg(long, env = "BALLAST_MEMBER_STORE")]
    pub(crate) store: String,
    /// Namespace of the MemberStore.
    #[arg(long, env = "BALLAST_MEMBER_STORE_NAMESPACE")]
    pub(crate) store_namespace: String,
    /// The data centre it serves in (one of the MemberStore's).
    #[arg(long, env = "BALLAST_DATA_CENTER")]
    pub(crate) data_center: String,
    /// Where the gRPC API listens (port 0 picks one).
    #[arg(long, env = "BALLAST_LISTEN_ADDR", default_value = "0.0.0.0:7072")]
    pub(crate) listen: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (port 0 picks one).
    #[arg(long, env = "BALLAST_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub(crate) metrics_addr: SocketAddr,
    /// Deadline of each store call.
    #[arg(long, env = "BALLAST_STORE_DEADLINE", default_value = "1s", value_parser = parse_duration)]
    pub(crate) store_deadline: Duration,
    /// Longest a replica read waits for a write it must show before asking the primary.
    #[arg(long, env = "BALLAST_READ_AFTER_WAIT", default_value = "500ms", value_parser = parse_duration)]
    pub(crate) read_after_wait: Duration,
    /// How long draining may take on shutdown.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub(crate) drain: Duration,
    /// Password of the member MySQL user.
    #[arg(long, env = "BALLAST_MEMBER_MYSQL_PASSWORD", hide_env_values = true)]
    pub(crate) mysql_password: Option<Secret>,
    /// Password of the member Redis servers.
    #[arg(long, env = "BALLAST_MEMBER_REDIS_PASSWORD", hide_env_values = true)]
    pub(crate) redis_password: Option<Secret>,
    /// User of the member Elasticsearch clusters.
    #[arg(long, env = "BALLAST_MEMBER_ES_USERNAME", hide_env_values = true)]
    pub(crate) es_username: Option<String>,
    /// Password of the member Elasticsearch clusters' user.
    #[arg(long, env = "BALLAST_MEMBER_ES_PASSWORD", hide_env_values = true)]
    pub(crate) es_password: Option<Secret>,
}

/// What the nightly job reads with.
#[derive(Debug, Args)]
pub(crate) struct NightlyArgs {
    /// How long after closing a window late events may still change it (the master's lateness).
    #[arg(long, env = "BALLAST_LATENESS", default_value = "120s", value_parser = parse_duration)]
    pub(crate) lateness: Duration,
    /// Deadline of each call to the cold store.
    #[arg(long, env = "BALLAST_COLD_DEADLINE", default_value = "30s", value_parser = parse_duration)]
    pub(crate) cold_deadline: Duration,
    /// Runs as if now were this instant (Unix ms): for tests and replays.
    #[arg(long, env = "BALLAST_NIGHTLY_NOW_MS")]
    pub(crate) now_ms: Option<i64>,
    /// Password of the hot MySQL user.
    #[arg(long, env = "BALLAST_HOT_MYSQL_PASSWORD", hide_env_values = true)]
    pub(crate) hot_password: Option<Secret>,
    /// Password of the KV Redis.
    #[arg(long, env = "BALLAST_KV_PASSWORD", hide_env_values = true)]
    pub(crate) kv_password: Option<Secret>,
    /// User of the cold store.
    #[arg(long, env = "BALLAST_COLD_USERNAME", hide_env_values = true)]
    pub(crate) cold_username: Option<String>,
    /// Password of the cold store's user.
    #[arg(long, env = "BALLAST_COLD_PASSWORD", hide_env_values = true)]
    pub(crate) cold_password: Option<Secret>,
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}`: expected a number followed by ms or s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        _ => Err(format!("`{text}`: unit must be ms or s")),
    }
}
