//! `ballast-worker`: the data-plane binary. One subcommand per role; `probe`
//! checks one dependency once, for pod start-up checks and people on call.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use ballast_worker::roles::master::{self, faults::FaultPolicy};
use ballast_worker::roles::{Deps, collector, intake, member, nightly, query, replicator, slave};
use ballast_worker::secret::Secret;
use ballast_worker::{probe, telemetry};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

mod args;

use args::{
    ComputeArgs, MasterArgs, MemberArgs, NightlyArgs, ProbeTarget, QueryArgs, ReplicatorArgs, StorePasswords,
    parse_duration,
};

/// Every role allocates per event (rows, messages, batches); mimalloc spends a
/// fraction of what glibc's allocator did on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command-line interface of the worker.
#[derive(Debug, Parser)]
#[command(name = "ballast-worker", version, about)]
struct Cli {
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, env = "BALLAST_LOG_FORMAT", default_value = "text")]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Who this pod is: set from the downward API by the operator's pod templates.
#[derive(Debug, Args)]
struct Pod {
    /// Pipeline this worker belongs to.
    #[arg(long, env = "BALLAST_PIPELINE")]
    pipeline: String,
    /// Namespace of the pipeline.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// Pod name: the worker's identity and membership Lease name.
    #[arg(long, env = "POD_NAME")]
    identity: String,
    /// Host peers reach this pod at.
    #[arg(long, env = "POD_IP", default_value = "127.0.0.1")]
    advertise_host: String,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (port 0 picks one).
    #[arg(long, env = "BALLAST_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// How long a Lease (membership, or the master's leadership) stays live without renewal.
    #[arg(long, env = "BALLAST_LEASE", default_value = "15s", value_parser = parse_duration)]
    lease: Duration,
    /// How long draining may take on shutdown.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    drain: Duration,
    /// The pipeline's data-plane token (from its Secret `<pipeline>-data-plane`):
    /// the collector, intakes, master and slaves carry it on every gRPC call and
    /// refuse a call without it.
    #[arg(long, env = "BALLAST_DATA_PLANE_TOKEN", hide_env_values = true)]
    data_plane_token: Option<Secret>,
}

impl Pod {
    /// The data-plane token, which the roles that call each other need.
    fn token(&self) -> Result<ballast_worker::auth::Token, String> {
        let secret = self
            .data_plane_token
            .as_ref()
            .ok_or("BALLAST_DATA_PLANE_TOKEN is not set: the data plane's gRPC calls are authenticated")?;
        ballast_worker::auth::Token::new(secret).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks one dependency once with its real client; exit 0 when it answers.
    Probe {
        #[command(flatten)]
        target: ProbeTarget,
        /// How long to wait for an answer.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Collector: the source database's binlog to Kafka (or to the backup intake while Kafka is down).
    Collector {
        #[command(flatten)]
        pod: Pod,
        /// Password of the source database user (from the pipeline's Secret).
        #[arg(long, env = "BALLAST_SOURCE_MYSQL_PASSWORD", hide_env_values = true)]
        source_password: Option<Secret>,
        /// Bytes of one transaction's events held before they are delivered
        /// ahead of its commit (a bulk UPDATE streams instead of filling memory).
        #[arg(long, env = "BALLAST_COLLECTOR_PART_BYTES", default_value_t = collector::PART_BYTES)]
        part_bytes: usize,
    },
    /// Intake: Kafka to the KV store (or to the slaves while the KV store is down).
    Intake {
        #[command(flatten)]
        pod: Pod,
        /// Most events written per batch.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Longest wait to fill a batch.
        #[arg(long, default_value = "20ms", value_parser = parse_duration)]
        linger: Duration,
        /// Password of the KV Redis (from the pipeline's Secret).
        #[arg(long, env = "BALLAST_KV_PASSWORD", hide_env_values = true)]
        kv_password: Option<Secret>,
        /// Where the backup intake (gRPC) listens (port 0 picks one).
        #[arg(long, env = "BALLAST_LISTEN_ADDR", default_value = "0.0.0.0:7070")]
        listen: SocketAddr,
    },
    /// Compute slave: runs window tasks with DataFusion, writes fenced results;
    /// holds routed events in memory while the KV store is down.
    Slave {
        #[command(flatten)]
        pod: Pod,
        /// Where the gRPC server listens (port 0 picks one).
        #[arg(long, env = "BALLAST_LISTEN_ADDR", default_value = "0.0.0.0:7071")]
        listen: SocketAddr,
        #[command(flatten)]
        compute: ComputeArgs,
        #[command(flatten)]
        stores: StorePasswords,
    },
    /// Query: the merchant-facing HTTP API over the hot results (on the
    /// metrics port, beside `/metrics`, `/healthz` and `/readyz`).
    Query {
        #[command(flatten)]
        pod: Pod,
        #[command(flatten)]
        args: QueryArgs,
    },
    /// Nightly: rolls closed days into the cold store, trims the hot MySQL,
    /// precomputes the frequent cold queries; prints its report (JSON) on stdout.
    Nightly {
        #[command(flatten)]
        pod: Pod,
        #[command(flatten)]
        args: NightlyArgs,
    },
    /// Member: the member-identity service of one data centre (gRPC `ballast.v1.Members`).
    Member {
        #[command(flatten)]
        args: MemberArgs,
    },
    /// Replicator: keeps the standby data centres' and the marketing Elasticsearch in step with the member change stream.
    Replicator {
        #[command(flatten)]
        args: ReplicatorArgs,
    },
    /// Master: elects the active master on a Lease, plans window tasks and schedules them on the slaves.
    Master {
        #[command(flatten)]
        pod: Pod,
        #[command(flatten)]
        args: MasterArgs,
    },
}

/// Cancels the returned token on SIGTERM or Ctrl-C.
fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        tracing::info!("shutting down: draining");
        cancel.cancel();
    });
    token
}

async fn kube_client() -> Result<kube::Client, String> {
    kube::Client::try_default()
        .await
        .map_err(|e| format!("Kubernetes client: {e}"))
}

async fn run_slave(
    pod: Pod,
    listen: SocketAddr,
    compute: ComputeArgs,
    stores: StorePasswords,
) -> Result<(), String> {
    let client = kube_client().await?;
    let token = pod.token()?;
    let config = slave::Config {
        token,
        namespace: pod.namespace,
        pipeline: pod.pipeline,
        identity: pod.identity,
        listen,
        advertise_host: pod.advertise_host,
        metrics: pod.metrics_addr,
        lease: pod.lease,
        drain: pod.drain,
        slots: compute.slots,
        compute_memory: ballast_worker::compute::runtime::memory_budget(
            compute.memory_bytes,
            compute.pod_memory_limit,
        ),
        kv_password: stores.kv_password,
        cache_password: stores.cache_password,
        hot_password: stores.hot_password,
    };
    slave::run(config, Deps { client }, shutdown_token())
        .await
        .map_err(|e| e.to_string())
}

async fn run_member(args: MemberArgs) -> Result<(), String> {
    let client = kube_client().await?;
    let config = member::Config {
        namespace: args.store_namespace,
        store: args.store,
        data_center: args.data_center,
        listen: args.listen,
        metrics: args.metrics_addr,
        deadline: args.store_deadline,
        read_after_wait: args.read_after_wait,
        drain: args.drain,
        mysql_password: args.mysql_password,
        redis_password: args.redis_password,
        es_credentials: args.es_username.zip(args.es_password),
    };
    member::run(config, Deps { client }, shutdown_token())
        .await
        .map_err(|e| e.to_string())
}

async fn run_replicator(args: ReplicatorArgs) -> Result<(), String> {
    let client = kube_client().await?;
    let config = replicator::Config {
        namespace: args.store_namespace,
        store: args.store,
        metrics: args.metrics_addr,
        deadline: args.store_deadline,
        drain: args.drain,
        es_credentials: args.es_username.zip(args.es_password),
    };
    replicator::run(config, Deps { client }, shutdown_token())
        .await
        .map_err(|e| e.to_string())
}

async fn run_nightly(pod: Pod, args: NightlyArgs) -> Result<(), String> {
    let client = kube_client().await?;
    let config = nightly::Config {
        namespace: pod.namespace,
        pipeline: pod.pipeline,
        lateness: args.lateness,
        deadline: args.cold_deadline,
        hot_password: args.hot_password,
        kv_password: args.kv_password,
        cold_credentials: args.cold_username.zip(args.cold_password),
        now_ms: args
            .now_ms
            .unwrap_or_else(|| k8s_openapi::jiff::Timestamp::now().as_millisecond()),
    };
    let report = nightly::run(config, Deps { client }, shutdown_token())
        .await
        .map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    Ok(())
}

async fn run_query(pod: Pod, args: QueryArgs) -> Result<(), String> {
    let client = kube_client().await?;
    let config = query::Config {
        namespace: pod.namespace,
        pipeline: pod.pipeline,
        listen: pod.metrics_addr,
        store_deadline: args.store_deadline,
        lateness: args.lateness,
        drain: pod.drain,
        cache_password: args.cache_password,
        hot_password: args.hot_password,
        cold_credentials: args.cold_username.zip(args.cold_password),
        cold_deadline: args.cold_deadline,
        precomputed_every: args.precomputed_every,
    };
    query::run(config, Deps { client }, shutdown_token())
        .await
        .map_err(|e| e.to_string())
}

async fn run_master(pod: Pod, args: MasterArgs) -> Result<(), String> {
    let client = kube_client().await?;
    let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let token = pod.token()?;
    let config = master::Config {
        token,
        namespace: pod.namespace,
        pipeline: pod.pipeline,
        identity: pod.identity,
        metrics: pod.metrics_addr,
        lease: pod.lease,
        grace: args.grace,
        events_per_task: args.events_per_task,
        to_date_every: args.to_date_every,
        in_flight_per_slave: args.in_flight_per_slave,
        lateness: args.lateness,
        faults: FaultPolicy {
            hung_floor_ms: millis(args.hung_after),
            delay_base_ms: millis(args.delay_base),
            ..FaultPolicy::default()
        },
        kv_password: args.kv_password,
    };
    master::run(config, Deps { client }, shutdown_token())
        .await
        .map_err(|e| e.to_string())
}

async fn run_collector(pod: Pod, source_password: Option<Secret>, part_bytes: usize) -> Result<(), String> {
    let client = kube_client().await?;
    let token = pod.token()?;
    let config = collector::Config {
        token,
        namespace: pod.namespace,
        pipeline: pod.pipeline,
        identity: pod.identity,
        metrics: pod.metrics_addr,
        source_password,
        part_bytes,
    };
    collector::run(config, Deps { client }, shutdown_token())
        .await
        .map_err(|e| e.to_string())
}

async fn run_intake(
    pod: Pod,
    batch: usize,
    linger: Duration,
    kv_password: Option<Secret>,
    listen: SocketAddr,
) -> Result<(), String> {
    let client = kube_client().await?;
    let token = pod.token()?;
    let config = intake::Config {
        token,
        namespace: pod.namespace,
        pipeline: pod.pipeline,
        metrics: pod.metrics_addr,
        batch: batch.max(1),
        linger,
        kv_password,
        identity: pod.identity,
        listen,
        advertise_host: pod.advertise_host,
        lease: pod.lease,
    };
    intake::run(config, Deps { client }, shutdown_token())
        .await
        .map_err(|e| e.to_string())
}

/// Runs a role to completion; a role that fails exits non-zero with the reason logged.
async fn role(
    name: &str,
    format: telemetry::LogFormat,
    run: impl std::future::Future<Output = Result<(), String>>,
) -> ExitCode {
    telemetry::init(format);
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, role = name, "stopped");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Probe { target, timeout } => {
            let endpoint = match target.endpoint() {
                Ok(endpoint) => endpoint,
                Err(problem) => {
                    eprintln!("{}: {problem}", target.kind);
                    return ExitCode::from(2);
                }
            };
            // An endpoint prints without its password, and errors are scrubbed of it.
            let kind = endpoint.kind();
            match probe::once(endpoint.clone(), timeout).await {
                Ok(detail) => {
                    println!("{kind}: {endpoint}: healthy ({detail})");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("{kind}: {endpoint}: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Collector {
            pod,
            source_password,
            part_bytes,
        } => {
            role(
                "collector",
                cli.log_format,
                run_collector(pod, source_password, part_bytes),
            )
            .await
        }
        Command::Slave {
            pod,
            listen,
            compute,
            stores,
        } => role("slave", cli.log_format, run_slave(pod, listen, compute, stores)).await,
        Command::Master { pod, args } => role("master", cli.log_format, run_master(pod, args)).await,
        Command::Member { args } => role("member", cli.log_format, run_member(args)).await,
        Command::Replicator { args } => role("replicator", cli.log_format, run_replicator(args)).await,
        Command::Query { pod, args } => role("query", cli.log_format, run_query(pod, args)).await,
        Command::Nightly { pod, args } => role("nightly", cli.log_format, run_nightly(pod, args)).await,
        Command::Intake {
            pod,
            batch,
            linger,
            kv_password,
            listen,
        } => {
            role(
                "intake",
                cli.log_format,
                run_intake(pod, batch, linger, kv_password, listen),
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_ms_and_s() {
        let cases = [
            ("250ms", Some(250)),
            ("5s", Some(5000)),
            ("7", Some(7000)),
            ("5m", None),
            ("s", None),
        ];
        for (text, want) in cases {
            let got = parse_duration(text).ok().map(|d| d.as_millis() as u64);
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn a_password_given_on_the_command_line_never_prints() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_from([
            "ballast-worker",
            "member",
            "--store",
            "s",
            "--store-namespace",
            "n",
            "--data-center",
            "dc-a",
            "--mysql-password",
            "hunter2",
            "--es-username",
            "elastic",
            "--es-password",
            "hunter3",
        ])?;
        let shown = format!("{cli:?} {cli:#?}");
        assert!(!shown.contains("hunter"), "{shown}");
        let Command::Member { args } = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.mysql_password.as_ref().map(Secret::expose), Some("hunter2"));
        Ok(())
    }

    #[test]
    fn a_probe_target_is_an_endpoint_or_names_what_is_missing() {
        // (arguments after `probe`, the endpoint as printed or the problem)
        let cases: [(&[&str], Result<&str, &str>); 8] = [
            (&["kafka", "k:9092"], Ok("k:9092")),
            (&["redis", "kv:6379"], Ok("kv:6379/0")),
            (&["redis", "kv:6379", "--database", "3"], Ok("kv:6379/3")),
            (
                &["redis", "kv:6379", "--database", "16"],
                Err("not a Redis database number"),
            ),
            (
                &[
                    "mysql",
                    "db:3306",
                    "--user",
                    "u",
                    "--database",
                    "d",
                    "--password",
                    "p@ss/w",
                ],
                Ok("u@db:3306/d"),
            ),
            (&["mysql", "db:3306", "--database", "d"], Err("needs --user")),
            (
                &["elasticsearch", "http://es:9200", "--user", "elastic"],
                Err("needs a password"),
            ),
            (
                &[
                    "elasticsearch",
                    "http://es:9200",
                    "--user",
                    "e",
                    "--password",
                    "p",
                ],
                Ok("http://es:9200 as e"),
            ),
        ];
        for (args, want) in cases {
            let cli = Cli::try_parse_from(["ballast-worker", "probe"].iter().chain(args)).expect("parses");
            let Command::Probe { target, .. } = cli.command else {
                panic!("parsed as another subcommand");
            };
            match (target.endpoint(), want) {
                (Ok(endpoint), Ok(printed)) => assert_eq!(endpoint.to_string(), printed, "{args:?}"),
                (Err(problem), Err(part)) => assert!(problem.contains(part), "{args:?}: {problem}"),
                (got, _) => panic!("{args:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn the_role_names_the_operator_runs_are_exactly_the_role_subcommands() {
        use clap::CommandFactory;
        let subcommands: std::collections::BTreeSet<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .filter(|name| name != "probe")
            .collect();
        let names = ballast_worker::roles::NAMES.map(str::to_owned).into();
        assert_eq!(subcommands, names);
    }
}
