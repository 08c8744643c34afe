//! `make bench`: the master.
//! - Dispatch overhead: tasks per second the master's scheduler and gRPC
//!   dispatch push through 8 real slave processes with empty tasks (windows
//!   with no events: the slave looks, finds nothing, answers), beside the same
//!   number of bare `Load` calls to the same slaves as the raw RPC floor.
//! - Failover: how long after the active master is killed the standby holds
//!   the lease, median of 10, against the lease duration.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ballast_e2e::Stack;
use ballast_worker::roles::master::dispatch::{self, Slaves};
use ballast_worker::roles::master::faults::FaultPolicy;
use ballast_worker::roles::master::schedule::{Estimator, SlaveView};
use ballast_worker::roles::master::tasks::{Snapshot, Table};
use ballast_worker::wire::LoadRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use serde_json::json;

const SLAVES: usize = 8;
const TASKS: usize = 20_000;
const IN_FLIGHT_PER_SLAVE: usize = 8;
const LEASE_SECONDS: u64 = 3;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The master's loop without persistence: plan, dispatch to the earliest
/// finish, record completions, until `TASKS` empty tasks are done.
async fn dispatch_run(slaves: &Slaves, members: &BTreeMap<String, String>) -> anyhow::Result<Duration> {
    // Far-past windows: never written, so every task is empty.
    let mut table = Table::restore(Snapshot::default(), 1, 0, FaultPolicy::default());
    for w in 0..TASKS as i64 {
        table.plan_window(w * 1000, (w + 1) * 1000, 1, 1);
    }
    let views: BTreeMap<String, SlaveView> = members
        .keys()
        .map(|n| {
            (
                n.clone(),
                SlaveView {
                    slots: 2,
                    ..SlaveView::default()
                },
            )
        })
        .collect();
    let estimator = Estimator::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let mut done = 0;
    while done < TASKS {
        let now = Timestamp::now().as_millisecond();
        for d in table.dispatch(now, &views, &estimator, 1, SLAVES * IN_FLIGHT_PER_SLAVE) {
            let client = slaves
                .get(&d.slave)
                .ok_or_else(|| anyhow::anyhow!("no client for {}", d.slave))?;
            let tx = tx.clone();
            let (key, version) = (d.planned.key.clone(), d.version);
            let task = dispatch::task_of(&d, None);
            tokio::spawn(async move {
                let result = dispatch::compute(client, task, Duration::from_secs(30)).await;
                let _ = tx.send((key, version, result));
            });
        }
        let Some(first) = rx.recv().await else { break };
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        for (key, version, result) in batch {
            if let Err(status) = &result {
                anyhow::bail!("task {} failed: {status}", key.id());
            }
            table.completed(&key, version, Ok(()), SLAVES, now);
            done += 1;
        }
    }
    assert_eq!(table.open(), 0);
    Ok(started.elapsed())
}

/// The same number of bare unary calls (`Load`) to the same slaves, equally concurrent.
async fn rpc_floor(slaves: &Slaves, members: &BTreeMap<String, String>) -> anyhow::Result<Duration> {
    let names: Vec<String> = members.keys().cloned().collect();
    let per_slave = TASKS / SLAVES;
    let started = Instant::now();
    let workers = names.iter().flat_map(|name| {
        (0..IN_FLIGHT_PER_SLAVE).map(move |_| {
            let mut client = slaves.get(name).expect("client");
            async move {
                for _ in 0..per_slave / IN_FLIGHT_PER_SLAVE {
                    client.load(LoadRequest {}).await?;
                }
                Ok::<_, tonic::Status>(())
            }
        })
    });
    for r in futures::future::join_all(workers).await {
        r?;
    }
    Ok(started.elapsed())
}

async fn holder(leases: &Api<Lease>, name: &str) -> anyhow::Result<Option<String>> {
    Ok(leases.get_opt(name).await?.and_then(|l| l.spec?.holder_identity))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let client = stack.kube_client().await?;
    let (ns, pipeline) = stack.pipeline_fixture(&client, "mb", json!({})).await?;
    let worker = std::path::Path::new(env!("CARGO_BIN_EXE_ballast-worker"));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);

    // Dispatch overhead.
    let mut slave_procs = Vec::new();
    for i in 0..SLAVES {
        slave_procs.push(stack.worker(worker, "slave", &ns, &pipeline, &format!("slave-{i}"))?);
    }
    let selector = ballast_worker::membership::selector(&pipeline, "slave");
    let deadline = Instant::now() + Duration::from_secs(90);
    let members = loop {
        let list = leases.list(&ListParams::default().labels(&selector)).await?;
        let members = ballast_worker::membership::ready_members(&list.items, Timestamp::now());
        if members.len() == SLAVES {
            break members;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {SLAVES} slaves joined",
            members.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let slaves = Slaves::new(ballast_e2e::DATA_PLANE_TOKEN.parse()?);
    slaves.update(&members);
    // Warm the connections.
    rpc_floor(&slaves, &members).await?;
    let mut ours = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..3 {
        ours.push(TASKS as f64 / dispatch_run(&slaves, &members).await?.as_secs_f64());
        floor.push(TASKS as f64 / rpc_floor(&slaves, &members).await?.as_secs_f64());
    }
    let (ours, floor) = (median(ours), median(floor));
    println!(
        "master dispatch, {SLAVES} slaves, empty tasks   {ours:>9.0} tasks/s   bare Load RPCs {floor:>9.0}/s   ratio {:.2}   (target >= 5000 tasks/s)",
        ours / floor
    );
    drop(slave_procs);

    // Failover: kill the active master, time until the standby holds the lease.
    let lease_name = format!("{pipeline}-master");
    let lease = format!("{LEASE_SECONDS}s");
    let env = [("BALLAST_LEASE", lease.as_str())];
    let mut masters: BTreeMap<String, ballast_e2e::KillOnDrop> = BTreeMap::new();
    for pod in ["master-0", "master-1"] {
        masters.insert(
            pod.into(),
            stack.worker_with(worker, &["master"], &ns, &pipeline, pod, &env)?,
        );
    }
    let mut takeovers = Vec::new();
    for round in 0..10 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let active = loop {
            if let Some(h) = holder(&leases, &lease_name)
                .await?
                .filter(|h| masters.contains_key(h))
            {
                break h;
            }
            anyhow::ensure!(Instant::now() < deadline, "round {round}: no active master");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Let the standby settle into waiting, then kill the active one hard.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let killed = Instant::now();
        masters.remove(&active);
        let standby = loop {
            if let Some(h) = holder(&leases, &lease_name).await?.filter(|h| *h != active) {
                break h;
            }
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(30),
                "round {round}: no takeover"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let took = killed.elapsed().as_secs_f64();
        takeovers.push(took);
        println!("  round {round}: {active} killed, {standby} active after {took:.2} s");
        masters.insert(
            active.clone(),
            stack.worker_with(worker, &["master"], &ns, &pipeline, &active, &env)?,
        );
    }
    let worst = takeovers.iter().copied().fold(0.0, f64::max);
    println!(
        "master failover, kill to standby holding       median {:.2} s   worst {worst:.2} s   lease {LEASE_SECONDS} s   (target < lease + 1 s)",
        median(takeovers)
    );
    Ok(())
}
