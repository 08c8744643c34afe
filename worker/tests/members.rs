//! The member cache's consistency against the real Redis, MySQL and
//! Elasticsearch of both member data centres: the seed's race forced step by
//! step, then many readers and writers at once in both data centres, ending
//! with no cache entry that differs from the stores.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use ballast_crds::{MemberStore, Mode};
use ballast_e2e::Stack;
use ballast_e2e::scenario::eventually;
use ballast_flow::Flow;
use ballast_worker::members::cache::{DcCache, Fill, Key, Lookup, Stale};
use ballast_worker::members::model::{Change, Identity, IdentityKind, Member};
use ballast_worker::roles::member::service::{Failure, Members, Stores, Timing};
use ballast_worker::roles::member::{self, caller::Class, metrics::Metrics};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(2);

/// A MemberStore of this test process named `name`, with its home database made.
async fn store(name: &str) -> anyhow::Result<(MemberStore, String)> {
    let stack = Stack::discover();
    let name = format!("{name}-{}", ballast_e2e::run_id());
    let home = format!("m_{}", name.replace('-', "_"));
    stack.member_home(&home).await?;
    let store: MemberStore = serde_json::from_value(stack.member_store(&name, &home)?)?;
    Ok((store, name))
}

async fn stores(store: &MemberStore, name: &str, dc: &str) -> anyhow::Result<Stores> {
    let config = member::Config {
        namespace: "test".into(),
        store: name.into(),
        data_center: dc.into(),
        listen: "127.0.0.1:0".parse()?,
        metrics: "127.0.0.1:0".parse()?,
        deadline: DEADLINE,
        read_after_wait: Duration::from_millis(500),
        drain: Duration::from_secs(1),
        mysql_password: Some("ballast".into()),
        redis_password: None,
        es_credentials: None,
    };
    member::connect(store, &config, &CancellationToken::new())
        .await?
        .context("connecting was cancelled")
}

/// The member operations of data centre `dc`, on the MySQL path.
fn members(store: &MemberStore, stores: Stores) -> Arc<Members> {
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let flow = Arc::new(Flow::new(member::rules(store, DEADLINE), &mut registry));
    let (_mode, published) = tokio::sync::watch::channel(Mode::Normal);
    let timing = Timing {
        deadline: DEADLINE,
        read_after_wait: Duration::from_millis(500),
    };
    // The sender is dropped: the mode stays Normal.
    Arc::new(Members::new(stores, flow, metrics, timing, published))
}

async fn lock_gone(cache: &DcCache, key: &str) -> anyhow::Result<()> {
    eventually("the write's lock to expire", 10, || async {
        // A write's lock deletes the entry, so an entry means no lock.
        Ok::<_, redis::RedisError>(match cache.read(key).await? {
            Lookup::Miss(lease) if lease.locked => None,
            _ => Some(()),
        })
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_reader_stalled_between_its_miss_and_its_fill_cannot_fill_what_a_writer_invalidated()
-> anyhow::Result<()> {
    let (store, name) = store("race").await?;
    let stores = stores(&store, &name, "dc-a").await?;
    let (a, b) = (&stores.caches[0], &stores.caches[1]);
    let key = stores.keys.entry(&Key::Member(1));
    let stale = [Stale {
        key: key.clone(),
        floor: 0,
    }];

    // The seed's race: the reader checks (no lock) and stalls; the writer
    // locks and deletes in both data centres; the reader's fill is refused.
    let Lookup::Miss(lease) = a.read(&key).await? else {
        bail!("a fresh key is cached");
    };
    ensure!(!lease.locked, "no write has locked a fresh key");
    a.invalidate(&stale).await?;
    b.invalidate(&stale).await?;
    assert_eq!(a.fill(&key, &lease, "stale", 1).await?, Fill::Refused);
    assert!(
        matches!(a.read(&key).await?, Lookup::Miss(_)),
        "nothing was cached"
    );

    // A reader that misses while the lock is held does not even try.
    let Lookup::Miss(locked) = a.read(&key).await? else {
        bail!("the key is cached");
    };
    ensure!(locked.locked, "the write's lock is held");
    assert_eq!(a.fill(&key, &locked, "stale", 1).await?, Fill::Skipped);

    // The lock alone is not the guard: a reader stalled past it is still
    // refused, by the version its miss saw.
    let Lookup::Miss(old) = a.read(&key).await? else {
        bail!("the key is cached");
    };
    a.invalidate(&stale).await?;
    lock_gone(a, &key).await?;
    let old_unlocked = ballast_worker::members::cache::Lease { locked: false, ..old };
    assert_eq!(a.fill(&key, &old_unlocked, "stale", 1).await?, Fill::Refused);

    // A reader that misses after the lock fills.
    let Lookup::Miss(fresh) = a.read(&key).await? else {
        bail!("the key is cached");
    };
    assert_eq!(a.fill(&key, &fresh, "fresh", 1).await?, Fill::Filled);
    assert_eq!(a.read(&key).await?, Lookup::Hit("fresh".into()));
    assert!(
        matches!(b.read(&key).await?, Lookup::Miss(_)),
        "dc-b has its own entries"
    );
    Ok(())
}

fn card(kind: IdentityKind, n: u64) -> Identity {
    Identity {
        kind,
        value: format!("{n:08}"),
    }
}

/// The member the stores hold for `key`: MySQL's row, or for an identity,
/// the row of the member MySQL binds it to.
async fn truth(stores: &Stores, key: &Key) -> anyhow::Result<Option<Member>> {
    let id = match key {
        Key::Member(id) => Some(*id),
        Key::Identity(identity) => stores.primary().db.owner(identity).await?,
    };
    match id {
        Some(id) => Ok(stores.primary().db.get(id).await?),
        None => Ok(None),
    }
}

#[tokio::test]
async fn many_readers_and_writers_in_both_data_centres_leave_no_stale_entry() -> anyhow::Result<()> {
    let (store, name) = store("stress").await?;
    let dc_a = members(&store, stores(&store, &name, "dc-a").await?);
    let dc_b = members(&store, stores(&store, &name, "dc-b").await?);
    let base = u64::from(ballast_e2e::run_id()) * 1_000;
    let mut ids = Vec::new();
    for n in 0..8u64 {
        let change = Change::Register {
            name: format!("member {n}"),
            level: "silver".into(),
            identities: [card(IdentityKind::TongchengCard, base + n)].into(),
        };
        ids.push(dc_a.register(change).await?.member.id);
    }
    let ids = Arc::new(ids);
    // Twelve cards shared by eight members: binds collide, and move cards around.
    let cards: Arc<Vec<Identity>> =
        Arc::new((0..12).map(|n| card(IdentityKind::ElongCard, base + n)).collect());
    // Writers stop first; readers go on through the writes' last lock and
    // refresh, the moment a careless fill would cache what Elasticsearch
    // still showed from before.
    let stop_writers = CancellationToken::new();
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let side = if w % 2 == 0 {
            Arc::clone(&dc_a)
        } else {
            Arc::clone(&dc_b)
        };
        let (ids, cards, stop) = (Arc::clone(&ids), Arc::clone(&cards), stop_writers.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(w);
            let mut writes = 0u64;
            while !stop.is_cancelled() {
                let id = ids[rng.usize(..ids.len())];
                let c = cards[rng.usize(..cards.len())].clone();
                let change = match rng.u8(..3) {
                    0 => Change::Bind(c),
                    1 => Change::Unbind(c),
                    _ => Change::Update {
                        name: None,
                        level: Some(format!("l{}", rng.u8(..5))),
                    },
                };
                match side.write(id, change).await {
                    Ok(_) | Err(Failure::Conflict(_)) => writes += 1,
                    Err(e) => return Err(anyhow::anyhow!("write: {e}")),
                }
            }
            Ok(writes)
        }));
    }
    for r in 0..8u64 {
        let side = if r % 2 == 0 {
            Arc::clone(&dc_a)
        } else {
            Arc::clone(&dc_b)
        };
        let (ids, cards, stop) = (Arc::clone(&ids), Arc::clone(&cards), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(100 + r);
            let mut reads = 0u64;
            while !stop.is_cancelled() {
                if rng.bool() {
                    side.get(ids[rng.usize(..ids.len())], None).await?;
                } else {
                    let c = cards[rng.usize(..cards.len())].clone();
                    side.lookup(&[c], Class::OrderFlow).await?;
                }
                reads += 1;
            }
            Ok::<_, anyhow::Error>(reads)
        }));
    }
    // The load runs for a while; the state checked is the one it leaves.
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop_writers.cancel();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let mut done = Vec::new();
    for task in tasks {
        done.push(task.await??);
    }
    let (writes, reads): (u64, u64) = (done[..4].iter().sum(), done[4..].iter().sum());
    ensure!(
        writes > 100 && reads > 100,
        "too little load: {writes} writes, {reads} reads"
    );

    // Quiescence: every lock expired. Then every entry either data centre
    // holds must equal what the stores hold.
    let mut keys: BTreeSet<Key> = ids.iter().map(|id| Key::Member(*id)).collect();
    keys.extend(cards.iter().cloned().map(Key::Identity));
    keys.extend((0..8).map(|n| Key::Identity(card(IdentityKind::TongchengCard, base + n))));
    let stores = dc_a.stores();
    for key in &keys {
        lock_gone(&stores.caches[0], &stores.keys.entry(key)).await?;
        lock_gone(&stores.caches[1], &stores.keys.entry(key)).await?;
    }
    // Fill every key in both data centres as readers would now, then compare.
    for key in &keys {
        for side in [&dc_a, &dc_b] {
            match key {
                Key::Member(id) => drop(side.get(*id, None).await?),
                Key::Identity(i) => drop(side.lookup(std::slice::from_ref(i), Class::OrderFlow).await?),
            }
        }
    }
    let mut stale = Vec::new();
    let mut cached = 0;
    for key in &keys {
        let expected = truth(stores, key).await?;
        for cache in &stores.caches {
            if let Lookup::Hit(entry) = cache.read(&stores.keys.entry(key)).await? {
                cached += 1;
                let held: Option<Member> = serde_json::from_str(&entry)?;
                if held != expected {
                    stale.push(format!(
                        "{} {key:?}: cached {held:?}, stores {expected:?}",
                        cache.name
                    ));
                }
            }
        }
    }
    assert!(
        stale.is_empty(),
        "{} stale of {cached} cached entries:\n{}",
        stale.len(),
        stale.join("\n")
    );
    ensure!(cached > keys.len(), "the caches were filled ({cached} entries)");
    Ok(())
}

/// The journal can hold two members' records in another order than their
/// claims were made: a former holder's older record (still listing the
/// identity) replayed after the new holder's. Replayed with what
/// Elasticsearch's claims give each member now, it does not take the
/// identity back, and the former holder's release leaves it with the new one.
#[tokio::test]
async fn a_former_holder_s_late_record_does_not_take_back_an_identity_claimed_since() -> anyhow::Result<()> {
    let (store, name) = store("replay-order").await?;
    let stores = stores(&store, &name, "dc-a").await?;
    let db = stores.primary().db.clone();
    let identity = card(
        IdentityKind::ElongCard,
        7_000 + u64::from(ballast_e2e::run_id() % 1_000),
    );
    let member = |id: u64, version: u64, holds: bool| Member {
        id,
        name: format!("m{id}"),
        level: "silver".into(),
        identities: if holds {
            BTreeSet::from([identity.clone()])
        } else {
            BTreeSet::new()
        },
        version,
        updated_ms: 1_700_000_000_000,
    };
    let (former, holder) = (
        1_000_000 + u64::from(ballast_e2e::run_id()),
        2_000_000 + u64::from(ballast_e2e::run_id()),
    );
    let claimed = BTreeSet::from([identity.clone()]);
    // In Elasticsearch: the former holder bound it (v3), released it (v4), then the holder bound it.
    // In the journal: the holder's bind first, then the former holder's v3 and v4.
    ensure!(db.put_state(&member(holder, 1, true), &claimed).await?);
    ensure!(db.put_state(&member(former, 3, true), &BTreeSet::new()).await?);
    ensure!(db.put_state(&member(former, 4, false), &BTreeSet::new()).await?);
    assert_eq!(db.owner(&identity).await?, Some(holder));
    // A state the claims give it takes the identity from whoever holds it in MySQL.
    ensure!(db.put_state(&member(former, 5, true), &claimed).await?);
    assert_eq!(db.owner(&identity).await?, Some(former));
    Ok(())
}
