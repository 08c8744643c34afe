//! The member MySQL's master lost, with the operator deciding, while writes
//! and lookups run through both data centres' member processes: DC A's
//! MySQL stops; the operator promotes DC B's replica (it lacked nothing)
//! under a new epoch and opens it, and the processes write to it. When DC
//! A's returns, the operator fences it (`read_only`) and re-points it at DC
//! B's by GTID; once it has caught up for the dwell, it switches back:
//! fences DC B's, lets DC A's apply everything, publishes it and re-points
//! DC B's at it. Nothing acknowledged is lost, and both servers end identical.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use ballast_crds::MemberStore;
use ballast_e2e::scenario::{RestoreMemberTopology, eventually};
use ballast_e2e::stack_script;
use ballast_worker::members::sql::MemberDb;
use kube::api::{Api, Patch, PatchParams};
use mysql_async::prelude::Queryable;

use crate::ONE_AT_A_TIME;
use crate::support::{Fixture, until_path};
use crate::traffic::Running;

/// What the operator's admin account reads of a member server: whether it
/// is `read_only`, the port it replicates from (both threads running) if
/// it does, and its GTID positions (binlog, current).
async fn server(url: &str) -> anyhow::Result<(bool, Option<u16>, String, String)> {
    let opts = mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(url)?)
        .user(Some("ballast_admin"))
        .pass(Some("ballast-admin"));
    let mut conn = tokio::time::timeout(Duration::from_secs(2), mysql_async::Conn::new(opts))
        .await
        .context("connecting timed out")??;
    let (read_only, binlog, current): (i64, String, String) = conn
        .query_first("SELECT @@read_only, @@gtid_binlog_pos, @@gtid_current_pos")
        .await?
        .context("no row")?;
    let status: Option<mysql_async::Row> = conn.query_first("SHOW SLAVE STATUS").await?;
    let source = status.and_then(|row| {
        let text = |c: &str| {
            row.get_opt::<String, _>(c)
                .and_then(Result::ok)
                .unwrap_or_default()
        };
        let running = text("Slave_IO_Running") == "Yes" && text("Slave_SQL_Running") == "Yes";
        running.then(|| text("Master_Port").parse().ok()).flatten()
    });
    conn.disconnect().await?;
    Ok((read_only != 0, source, binlog, current))
}

#[tokio::test]
async fn a_lost_mysql_master_is_replaced_by_its_replica_then_fenced_re_pointed_and_switched_back_to()
-> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-mysql-fo").await?;
    let client = f.stack.kube_client().await?;
    let api: Api<MemberStore> = Api::namespaced(client, &f.namespace);
    let dwell = serde_json::json!({"spec": {"promotion": {"failbackDwellSeconds": 3}}});
    api.patch(&f.name, &PatchParams::default(), &Patch::Merge(&dwell))
        .await?;
    let _operator = f.operate().await?;
    let (url_a, url_b) = (
        f.stack.get(ballast_e2e::members::PRIMARY_MYSQL)?,
        f.stack.get(ballast_e2e::members::REPLICA_MYSQL)?,
    );
    let port = |url: &str| mysql_async::Opts::from_url(url).map(|o| o.tcp_port());
    let (port_a, port_b) = (port(&url_a)?, port(&url_b)?);

    // The operator has measured DC B's replica in sync.
    let store = eventually("dc-b's replica measured in sync", 60, || async {
        let ms = api.get(&f.name).await?;
        let status = ms.status.clone().unwrap_or_default();
        let in_sync = status
            .mysql_replication
            .iter()
            .any(|r| r.data_center == "dc-b" && r.replicating && r.lag_transactions == 0);
        Ok::<_, kube::Error>((in_sync && ms.mysql_master() == "dc-a").then_some(ms))
    })
    .await?;
    let epoch = store.epoch();

    let traffic = Running::start(
        f.caller('a', "orders", "order-flow").await?,
        f.caller('b', "orders", "order-flow").await?,
    );
    traffic
        .until_acked("writes under way", Instant::now(), 20, 30)
        .await?;

    // 1. DC A's MySQL stops: DC B's is promoted, opened, and written.
    let _restore = RestoreMemberTopology;
    let stopped = Instant::now();
    stack_script(&["stop", "mysql-member-dc-a"])?;
    let promoted = eventually("dc-b promoted", 60, || async {
        let ms = api.get(&f.name).await?;
        Ok::<_, kube::Error>((ms.mysql_master() == "dc-b").then_some(ms))
    })
    .await?;
    let promotion = stopped.elapsed();
    ensure!(
        promoted.epoch() == epoch + 1,
        "epoch {} after {epoch}",
        promoted.epoch()
    );
    eventually(
        "dc-b's MySQL open: no longer read_only nor a replica",
        30,
        || async {
            let (read_only, source, ..) = server(&url_b).await?;
            Ok::<_, anyhow::Error>((!read_only && source.is_none()).then_some(()))
        },
    )
    .await?;
    let opened = Instant::now();
    for metrics in [f.a.metrics, f.b.metrics] {
        until_path(metrics, 0.0, 90).await?;
    }
    traffic
        .until_acked("writes acknowledged on the promoted master", opened, 20, 30)
        .await?;

    // 2. DC A's returns: fenced and re-pointed at DC B's, then switched back to.
    let returned = Instant::now();
    let reads_in_outage = traffic.so_far().read_between(stopped, returned);
    ensure!(
        reads_in_outage > 0,
        "no lookup answered while dc-a's MySQL was down"
    );
    stack_script(&["up"])?;
    eventually("dc-a fenced and replicating from dc-b", 60, || async {
        let (read_only, source, ..) = server(&url_a).await?;
        Ok::<_, anyhow::Error>((read_only && source == Some(port_b)).then_some(()))
    })
    .await?;
    let back = eventually("switched back to dc-a", 90, || async {
        let ms = api.get(&f.name).await?;
        Ok::<_, kube::Error>((ms.mysql_master() == "dc-a").then_some(ms))
    })
    .await?;
    let switched = Instant::now();
    ensure!(
        back.epoch() == epoch + 2,
        "epoch {} after the switch back",
        back.epoch()
    );
    eventually("dc-a open and dc-b fenced, replicating from dc-a", 30, || async {
        let (a_read_only, a_source, ..) = server(&url_a).await?;
        let (b_read_only, b_source, ..) = server(&url_b).await?;
        let done = !a_read_only && a_source.is_none() && b_read_only && b_source == Some(port_a);
        Ok::<_, anyhow::Error>(done.then_some(()))
    })
    .await?;
    traffic
        .until_acked("writes acknowledged after the switch back", switched, 20, 60)
        .await?;
    let traffic = traffic.finish().await?;

    // 3. Every acknowledged write is in DC A's MySQL, and DC B's equals it.
    eventually("dc-b applied all of dc-a's", 30, || async {
        let (.., a_binlog, _) = server(&url_a).await?;
        let (.., b_current) = server(&url_b).await?;
        Ok::<_, anyhow::Error>((a_binlog == b_current).then_some(()))
    })
    .await?;
    let db = |url: &str| {
        let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(url)?);
        anyhow::Ok(MemberDb::replica(pool, &f.home, 1024))
    };
    let (in_a, in_b) = (db(&url_a)?.await?, db(&url_b)?.await?);
    let acknowledged = &traffic.acknowledged;
    // Side A is dc-a's MySQL, side B dc-b's.
    let differ = traffic
        .differences(|n| {
            let (in_a, in_b) = (&in_a, &in_b);
            async move { Ok((in_a.get(n).await?, in_b.get(n).await?)) }
        })
        .await?;
    assert!(
        differ.is_empty(),
        "{} differences:\n{}",
        differ.len(),
        differ.join("\n")
    );
    ensure!(
        acknowledged.len() >= 20,
        "{} members acknowledged",
        acknowledged.len()
    );
    eprintln!(
        "promotion published {:.1} s after the stop; {} members, {} writes acknowledged; {reads_in_outage} lookups answered in the outage",
        promotion.as_secs_f64(),
        acknowledged.len(),
        traffic.acked_at.len(),
    );
    Ok(())
}
