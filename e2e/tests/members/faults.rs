//! The member service's failures: a data centre's cache gone (writes refused
//! whole), and the primary MySQL gone (writes through Elasticsearch,
//! journaled, replayed on its return with nothing acknowledged lost).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use ballast_e2e::scenario::{RestoreStack, eventually, metric};
use ballast_e2e::stack_script;
use ballast_worker::members::search::MemberIndex;
use ballast_worker::members::sql::MemberDb;
use ballast_worker::roles::member::grpc;
use ballast_worker::wire::{Member, WriteReply};
use tonic::{Code, Status};

use crate::ONE_AT_A_TIME;
use crate::support::{Caller, Fixture, card, id_of, until_path};
use crate::traffic::retryable;

/// `dc`'s Redis breaker state (0 closed, 1 open) in the process on `port`.
async fn redis_breaker(port: u16, dc: &str) -> anyhow::Result<Option<f64>> {
    let series = format!("ballast_flow_breaker_state{{dependency=\"redis\",server=\"{dc}\"}}");
    Ok(metric(port, &series).await?)
}

#[tokio::test]
async fn with_one_data_centre_s_cache_stopped_a_write_fails_naming_it_and_nothing_is_written()
-> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-redis").await?;
    let a = f.caller('a', "orders", "order-flow").await?;
    let id = id_of(&a.register("庚", vec![card(6)]).await?);
    let _restore = RestoreStack;
    stack_script(&["stop", "redis-member-dc-b"])?;
    let refused = a
        .level(&id, "gold")
        .await
        .err()
        .context("a write without dc-b's cache succeeded")?;
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("redis dc-b"), "{}", refused.message());
    // Nothing half-written: MySQL still has the member as it was.
    let member = a.get(&id, "").await?;
    assert_eq!((member.level.as_str(), member.version), ("silver", 1));

    // Writes keep failing on dc-b's cache until its breaker opens; each
    // names it. DC A's own cache has a breaker of its own, still closed, so
    // a read in DC A right after still reaches it (one breaker for both
    // caches would refuse it for the open period: "unavailable").
    let opened = eventually("dc-b's redis breaker open in dc-a's process", 30, || async {
        let refused = a
            .level(&id, "gold")
            .await
            .err()
            .context("a write without dc-b's cache succeeded")?;
        anyhow::ensure!(refused.message().contains("redis dc-b"), "{}", refused.message());
        Ok::<_, anyhow::Error>((redis_breaker(f.a.metrics, "dc-b").await? == Some(1.0)).then_some(refused))
    })
    .await?;
    assert_eq!(opened.code(), Code::Unavailable);
    let cache = |result: &'static str| async move {
        let series = format!("ballast_member_cache_total{{result=\"{result}\"}}");
        Ok::<_, anyhow::Error>(metric(f.a.metrics, &series).await?.unwrap_or(0.0))
    };
    let reached = || async { Ok::<_, anyhow::Error>(cache("hit").await? + cache("miss").await?) };
    let (reached_before, unavailable_before) = (reached().await?, cache("unavailable").await?);
    assert_eq!(a.get(&id, "").await?.level, "silver");
    assert_eq!(
        (
            reached().await? - reached_before,
            cache("unavailable").await? - unavailable_before
        ),
        (1.0, 0.0),
        "a read in dc-a went to dc-a's cache (hit or miss), not around it"
    );
    assert_eq!(
        redis_breaker(f.a.metrics, "dc-a").await?,
        Some(0.0),
        "dc-a's breaker"
    );
    stack_script(&["up"])?;
    let written = eventually("a write once dc-b's cache is back", 60, || async {
        Ok::<_, Status>(a.level(&id, "gold").await.ok())
    })
    .await?;
    assert_eq!(written.member.map(|m| m.level).as_deref(), Some("gold"));
    Ok(())
}

/// Retries `write` while the failure is one a caller retries (a dependency
/// down, a race); the acknowledged reply, or the refusal that is an answer.
async fn until_answered<F, Fut>(mut write: F) -> anyhow::Result<Result<WriteReply, Status>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<WriteReply, Status>>,
{
    for _ in 0..200 {
        match write().await {
            Err(s) if retryable(s.code()) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answer => return Ok(answer),
        }
    }
    anyhow::bail!("a write was not answered within 200 tries")
}

fn as_model(m: &Member) -> (String, String, Vec<(i32, String)>, u64) {
    let mut ids: Vec<(i32, String)> = m.identities.iter().map(|i| (i.kind, i.value.clone())).collect();
    ids.sort();
    (m.member_id.clone(), m.level.clone(), ids, m.version)
}

fn model_of(m: &ballast_worker::members::model::Member) -> (String, String, Vec<(i32, String)>, u64) {
    as_model(&grpc::to_wire(m))
}

#[tokio::test]
async fn a_thousand_writes_made_while_mysql_is_down_are_all_in_mysql_once_it_returns() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-mysql").await?;
    let a = f.caller('a', "orders", "order-flow").await?;
    let b = f.caller('b', "orders", "order-flow").await?;
    let mut expected: BTreeMap<String, Member> = BTreeMap::new();
    let remember = |reply: &WriteReply, expected: &mut BTreeMap<String, Member>| {
        if let Some(m) = &reply.member {
            let newer = expected.get(&m.member_id).is_none_or(|e| e.version <= m.version);
            if newer {
                expected.insert(m.member_id.clone(), m.clone());
            }
        }
    };
    let mut ids = Vec::new();
    for n in 0..20 {
        let reply = a.register(&format!("member {n}"), vec![card(100 + n)]).await?;
        ids.push(id_of(&reply));
        remember(&reply, &mut expected);
    }

    let _restore = RestoreStack;
    stack_script(&["stop", "mysql-member-dc-a"])?;
    let rng = fastrand_like(7);
    let mut answered_conflicts = 0;
    let mut acknowledged = 0.0;
    for n in 0..1_000u64 {
        let caller: &Caller = if n % 2 == 0 { &a } else { &b };
        let id = ids[rng(n) % ids.len()].clone();
        let c = card(200 + rng(n + 1) as u64 % 30);
        let text = format!("{n}");
        let answer = match n % 5 {
            0 => until_answered(|| caller.register(&text, vec![card(1_000 + n)])).await?,
            1 | 2 => until_answered(|| caller.bind(&id, c.clone())).await?,
            3 => until_answered(|| caller.unbind(&id, c.clone())).await?,
            _ => until_answered(|| caller.level(&id, &text)).await?,
        };
        match answer {
            Ok(reply) => {
                acknowledged += 1.0;
                if n % 5 == 0 {
                    ids.push(id_of(&reply));
                }
                remember(&reply, &mut expected);
            }
            Err(s) if s.code() == Code::AlreadyExists => answered_conflicts += 1,
            Err(s) => anyhow::bail!("write {n}: {s}"),
        }
    }
    // Every write acknowledged while MySQL was down went through Elasticsearch.
    let journaled = metric(f.a.metrics, "ballast_member_writes_total{path=\"elasticsearch\"}")
        .await?
        .unwrap_or(0.0)
        + metric(f.b.metrics, "ballast_member_writes_total{path=\"elasticsearch\"}")
            .await?
            .unwrap_or(0.0);
    ensure!(
        journaled >= acknowledged && acknowledged >= 500.0,
        "{acknowledged} writes acknowledged, {journaled} through Elasticsearch"
    );

    stack_script(&["up"])?;
    for port in [f.a.metrics, f.b.metrics] {
        until_path(port, 0.0, 120).await?;
    }
    // MySQL equals Elasticsearch equals what was acknowledged.
    let primary = f.stack.get(ballast_e2e::members::PRIMARY_MYSQL)?;
    let db = MemberDb::replica(
        mysql_async::Pool::new(mysql_async::Opts::from_url(&primary)?),
        &f.home,
        1024,
    )
    .await?;
    let es = ballast_worker::connect::elasticsearch(&f.stack.get("BALLAST_ES_DC_A_URL")?, None)?;
    let index = MemberIndex::new(es, &f.namespace, &f.name, Duration::from_secs(5));
    let mut differ = Vec::new();
    for (id, member) in &expected {
        let n: u64 = id.parse()?;
        let want = as_model(member);
        let in_mysql = db.get(n).await?.map(|m| model_of(&m));
        let in_es = index.get(n).await?.map(|m| model_of(&m));
        if in_mysql.as_ref() != Some(&want) || in_es.as_ref() != Some(&want) {
            differ.push(format!(
                "{id}: acknowledged {want:?}, MySQL {in_mysql:?}, ES {in_es:?}"
            ));
        }
        for identity in &member.identities {
            let identity = grpc::identity(Some(identity))?;
            let owner = db.owner(&identity).await?;
            if owner != Some(n) {
                differ.push(format!(
                    "{identity} is claimed by {owner:?} in MySQL, held by {id}"
                ));
            }
        }
    }
    assert!(
        differ.is_empty(),
        "{} differences:\n{}",
        differ.len(),
        differ.join("\n")
    );
    ensure!(expected.len() >= 200, "{} members acknowledged", expected.len());
    ensure!(
        answered_conflicts > 0,
        "no bind met a card bound elsewhere: the mix tested less than it should"
    );
    Ok(())
}

/// A small deterministic mix (no dependency for it): `n` scrambled.
fn fastrand_like(seed: u64) -> impl Fn(u64) -> usize {
    move |n| {
        let x = (n ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        usize::try_from((x >> 33) % 1_000_003).unwrap_or(0)
    }
}

/// Publishes `mode` for the member MySQL in the MemberStore's status, as the operator would.
async fn publish_mysql(f: &Fixture, mode: &str, epoch: i64) -> anyhow::Result<()> {
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<ballast_crds::MemberStore> = Api::namespaced(f.stack.kube_client().await?, &f.namespace);
    let since = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = serde_json::json!({"status": {"mysql": {"mode": mode, "since": since, "epoch": epoch}}});
    api.patch_status(&f.name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_published_degraded_mysql_moves_writes_to_elasticsearch_and_back_once_they_are_replayed()
-> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let f = Fixture::start("ms-mode").await?;
    let a = f.caller('a', "orders", "order-flow").await?;
    let id = id_of(&a.register("辛", vec![card(7)]).await?);
    publish_mysql(&f, "Degraded", 1).await?;
    until_path(f.a.metrics, 2.0, 30).await?;
    let written = a.level(&id, "through-es").await?;
    assert!(written.read_after.is_empty(), "no MySQL transaction, no GTID");
    let es_writes = metric(f.a.metrics, "ballast_member_writes_total{path=\"elasticsearch\"}").await?;
    assert_eq!(es_writes, Some(1.0));
    // MySQL answers: the replay brings the journaled write into it meanwhile.
    let primary = f.stack.get(ballast_e2e::members::PRIMARY_MYSQL)?;
    let db = MemberDb::replica(
        mysql_async::Pool::new(mysql_async::Opts::from_url(&primary)?),
        &f.home,
        1024,
    )
    .await?;
    let n: u64 = id.parse()?;
    eventually("the journaled write replayed into MySQL", 30, || async {
        Ok::<_, anyhow::Error>(db.get(n).await?.filter(|m| m.level == "through-es"))
    })
    .await?;
    // A write Elasticsearch took whose record the journal lacks (Kafka
    // refused it after Elasticsearch said yes): made here straight into the index.
    let es = ballast_worker::connect::elasticsearch(&f.stack.get("BALLAST_ES_DC_A_URL")?, None)?;
    let index = MemberIndex::new(es, &f.namespace, &f.name, Duration::from_secs(5));
    let mut unjournaled = index.get(n).await?.context("the member's document")?;
    unjournaled.level = "unjournaled".into();
    unjournaled.version += 1;
    unjournaled.updated_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    index.put_next(&unjournaled, 0).await?;
    publish_mysql(&f, "Normal", 2).await?;
    until_path(f.a.metrics, 0.0, 30).await?;
    // The catch-up's sweep brought it into MySQL before the path came back.
    let row = db.get(n).await?.context("the member's row")?;
    assert_eq!(
        (row.level.as_str(), row.version),
        ("unjournaled", unjournaled.version)
    );
    let back = a.level(&id, "through-mysql").await?;
    ensure!(!back.read_after.is_empty(), "back on MySQL: the write has a GTID");
    assert_eq!(a.get(&id, &back.read_after).await?.level, "through-mysql");
    Ok(())
}
