//! `make bench`: the member service through its gRPC API on loopback (flow
//! control, caller checks and all), each beside a raw baseline by the same
//! kind of client at the same concurrency in the same run:
//! (a) lookups by phone answered from the cache, against raw GETs of the
//!     same cache entries from the same Redis, and against the gRPC floor: a
//!     server on the same transport answering every lookup with a fixed
//!     member, no work at all (what the protocol costs on these two cores);
//! (b) lookups by phone that miss the cache and are answered by a term query
//!     on the primary Elasticsearch cluster, against the same term queries
//!     issued raw;
//! (c) writes (a member's level): MySQL, Elasticsearch, the change stream
//!     and both data centres' caches, against the same writes issued raw
//!     (one MySQL UPDATE transaction, one Elasticsearch index request, one
//!     Kafka record, a DEL in each Redis).
//! Each figure is the median of 3 runs.

mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ballast_crds::{MemberStore, Mode};
use ballast_e2e::Stack;
use ballast_flow::Flow;
use ballast_worker::members::cache::Key;
use ballast_worker::members::model::{Change, Identity, IdentityKind, Member};
use ballast_worker::members::search::{MemberIndex, document};
use ballast_worker::roles::member::grpc::MemberApi;
use ballast_worker::roles::member::service::{Members, Timing};
use ballast_worker::roles::member::{self, metrics::Metrics};
use ballast_worker::wire::members_client::MembersClient;
use ballast_worker::wire::{self, LookupRequest, UpdateRequest};
use elasticsearch::{BulkOperation, BulkParts, SearchParts};
use mysql_async::prelude::Queryable;
use prometheus_client::registry::Registry;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{Run, medians};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONCURRENCY: usize = 32;
const RUN: Duration = Duration::from_secs(3);
const RUNS: usize = 3;
/// Members registered through the service (cache-hit lookups, writes).
const MEMBERS: u64 = 1_000;
/// Member documents loaded straight into Elasticsearch for each run of
/// cache-miss lookups (more than a run looks up, so none is asked twice).
const UNCACHED: u64 = 40_000;
const DEADLINE: Duration = Duration::from_secs(2);

fn phone(n: u64) -> Identity {
    Identity {
        kind: IdentityKind::Phone,
        value: format!("13{:09}", n),
    }
}

fn to_wire(identity: &Identity) -> wire::Identity {
    wire::Identity {
        kind: wire::IdentityKind::Phone.into(),
        value: identity.value.clone(),
    }
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-ballast-caller", "bench".parse().expect("ascii"));
    request
        .metadata_mut()
        .insert("x-ballast-caller-class", "order-flow".parse().expect("ascii"));
    request
}

async fn connect_clients(port: u16) -> anyhow::Result<Vec<MembersClient<Channel>>> {
    let mut clients = Vec::new();
    for _ in 0..CONCURRENCY {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        clients.push(MembersClient::new(channel));
    }
    Ok(clients)
}

/// The gRPC floor: every lookup answered at once with the same member.
struct Floor(wire::Member);

#[tonic::async_trait]
impl wire::members_server::Members for Floor {
    async fn register(
        &self,
        _: tonic::Request<wire::RegisterRequest>,
    ) -> Result<tonic::Response<wire::WriteReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("floor"))
    }
    async fn update(
        &self,
        _: tonic::Request<UpdateRequest>,
    ) -> Result<tonic::Response<wire::WriteReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("floor"))
    }
    async fn bind(
        &self,
        _: tonic::Request<wire::BindRequest>,
    ) -> Result<tonic::Response<wire::WriteReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("floor"))
    }
    async fn unbind(
        &self,
        _: tonic::Request<wire::BindRequest>,
    ) -> Result<tonic::Response<wire::WriteReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("floor"))
    }
    async fn get(
        &self,
        _: tonic::Request<wire::GetRequest>,
    ) -> Result<tonic::Response<wire::Member>, tonic::Status> {
        Err(tonic::Status::unimplemented("floor"))
    }
    async fn lookup(
        &self,
        _: tonic::Request<LookupRequest>,
    ) -> Result<tonic::Response<wire::LookupReply>, tonic::Status> {
        Ok(tonic::Response::new(wire::LookupReply {
            member: Some(self.0.clone()),
        }))
    }
    async fn lookup_many(
        &self,
        _: tonic::Request<wire::LookupManyRequest>,
    ) -> Result<tonic::Response<wire::LookupManyReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("floor"))
    }
    async fn bindings(
        &self,
        _: tonic::Request<wire::GetRequest>,
    ) -> Result<tonic::Response<wire::BindingsReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("floor"))
    }
}

fn line(what: &str, run: Run) {
    println!(
        "  {what:<44} {:>9.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
        run.per_second, run.p50_ms, run.p99_ms
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let name = format!("bench-{}", ballast_e2e::run_id());
    let home = format!("m_bench_{}", ballast_e2e::run_id());
    stack.member_home(&home).await?;
    let mut spec = stack.member_store(&name, &home)?;
    spec["spec"]["flowControl"] =
        serde_json::json!({"globalRatePerSecond": 10_000_000, "hotKeyRatePerSecond": 10_000_000});
    let store: MemberStore = serde_json::from_value(spec)?;
    let config = member::Config {
        namespace: "bench".into(),
        store: name.clone(),
        data_center: "dc-a".into(),
        listen: "127.0.0.1:0".parse()?,
        metrics: "127.0.0.1:0".parse()?,
        deadline: DEADLINE,
        read_after_wait: Duration::from_millis(500),
        drain: Duration::from_secs(1),
        mysql_password: Some("ballast".into()),
        redis_password: None,
        es_credentials: None,
    };
    let stores = member::connect(&store, &config, &CancellationToken::new())
        .await?
        .context("cancelled")?;
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let flow = Arc::new(Flow::new(member::rules(&store, DEADLINE), &mut registry));
    let (_mode, published) = tokio::sync::watch::channel(Mode::Normal);
    let timing = Timing {
        deadline: DEADLINE,
        read_after_wait: Duration::from_millis(500),
    };
    let members = Arc::new(Members::new(stores.clone(), flow, metrics, timing, published));
    ballast_worker::roles::member::follow::apply(
        &store,
        &members,
        DEADLINE,
        &tokio::sync::watch::channel(Mode::Normal).0,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(
        ballast_worker::grpc::server()
            .add_service(MemberApi::new(Arc::clone(&members)).service())
            .serve_with_incoming(ballast_worker::grpc::incoming(listener)),
    );

    // Members through the service; their phones cached by one lookup each
    // once the registrations' locks are gone.
    let mut ids = Vec::new();
    for n in 0..MEMBERS {
        let change = Change::Register {
            name: format!("m{n}"),
            level: "silver".into(),
            identities: [phone(n)].into(),
        };
        ids.push(members.register(change).await?.member.id);
    }
    tokio::time::sleep(ballast_worker::members::cache::LOCK + Duration::from_millis(500)).await;
    let all: Vec<Identity> = (0..MEMBERS).map(phone).collect();
    for chunk in all.chunks(100) {
        members.lookup(chunk, member::caller::Class::OrderFlow).await?;
    }
    let clients = Arc::new(connect_clients(port).await?);
    let cache = redis::Client::open(stack.get("BALLAST_REDIS_MEMBER_DC_A_URL")?)?;
    let mut redis_conns = Vec::new();
    for _ in 0..CONCURRENCY {
        redis_conns.push(cache.get_multiplexed_async_connection().await?);
    }
    let redis_conns = Arc::new(redis_conns);
    let keys: Arc<Vec<String>> = Arc::new(
        all.iter()
            .map(|i| stores.keys.entry(&Key::Identity(i.clone())))
            .collect(),
    );
    let hit: String = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut redis_conns[0].clone())
        .await?;
    anyhow::ensure!(hit.contains("m0"), "the cache holds the members: {hit}");

    // The floor's server, answering with a registered member as the service would.
    let sample = members.get(ids[0], None).await?.context("a registered member")?;
    let floor_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let floor_port = floor_listener.local_addr()?.port();
    tokio::spawn(
        ballast_worker::grpc::server()
            .add_service(wire::members_server::MembersServer::new(Floor(
                member::grpc::to_wire(&sample),
            )))
            .serve_with_incoming(ballast_worker::grpc::incoming(floor_listener)),
    );
    let floor_clients = Arc::new(connect_clients(floor_port).await?);

    // (a) cache hits.
    let (mut api_hits, mut raw_gets, mut floors) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let c = Arc::clone(&floor_clients);
        floors.push(
            support::load(CONCURRENCY, RUN, move |task, i| {
                let mut client = c[task].clone();
                let identity = to_wire(&phone(i as u64 % MEMBERS));
                async move {
                    client
                        .lookup(request(LookupRequest {
                            identity: Some(identity),
                        }))
                        .await?;
                    Ok(())
                }
            })
            .await?,
        );
        let c = Arc::clone(&clients);
        api_hits.push(
            support::load(CONCURRENCY, RUN, move |task, i| {
                let mut client = c[task].clone();
                let identity = to_wire(&phone(i as u64 % MEMBERS));
                async move {
                    let found = client
                        .lookup(request(LookupRequest {
                            identity: Some(identity),
                        }))
                        .await?;
                    anyhow::ensure!(found.into_inner().member.is_some(), "a registered phone is found");
                    Ok(())
                }
            })
            .await?,
        );
        let (r, k) = (Arc::clone(&redis_conns), Arc::clone(&keys));
        raw_gets.push(
            support::load(CONCURRENCY, RUN, move |task, i| {
                let mut conn = r[task].clone();
                let key = k[i % k.len()].clone();
                async move {
                    let entry: Option<String> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
                    anyhow::ensure!(entry.is_some(), "the entry is cached");
                    Ok(())
                }
            })
            .await?,
        );
    }

    // (b) misses answered by the primary cluster: documents loaded straight
    // in, each phone asked once (the service caches it, so no run reuses one).
    let es = ballast_worker::connect::elasticsearch(&stack.get("BALLAST_ES_DC_A_URL")?, None)?;
    let index = MemberIndex::new(es.clone(), "bench", &name, DEADLINE);
    let base = 10_000_000u64;
    for run in 0..(2 * RUNS as u64) {
        let mut ops: Vec<BulkOperation<serde_json::Value>> = Vec::new();
        for n in 0..UNCACHED {
            let number = base + run * UNCACHED + n;
            let member = Member {
                id: number,
                name: format!("u{number}"),
                level: "gold".into(),
                identities: [phone(number)].into(),
                version: 1,
                updated_ms: 1,
            };
            ops.push(
                BulkOperation::index(document(&member))
                    .id(number.to_string())
                    .routing(number.to_string())
                    .into(),
            );
            if ops.len() == 5_000 {
                bulk(&es, index.index(), std::mem::take(&mut ops)).await?;
            }
        }
        bulk(&es, index.index(), ops).await?;
    }
    es.indices()
        .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[
            index.index()
        ]))
        .send()
        .await?;
    let (mut api_misses, mut raw_searches) = (Vec::new(), Vec::new());
    for run in 0..RUNS as u64 {
        let c = Arc::clone(&clients);
        let first = base + 2 * run * UNCACHED;
        api_misses.push(
            support::load(CONCURRENCY, RUN, move |task, i| {
                let mut client = c[task].clone();
                let identity = to_wire(&phone(first + i as u64 % UNCACHED));
                async move {
                    let found = client
                        .lookup(request(LookupRequest {
                            identity: Some(identity),
                        }))
                        .await?;
                    anyhow::ensure!(found.into_inner().member.is_some(), "a loaded phone is found");
                    Ok(())
                }
            })
            .await?,
        );
        let (es, idx) = (es.clone(), index.index().to_owned());
        let first = base + (2 * run + 1) * UNCACHED;
        raw_searches.push(
            support::load(CONCURRENCY, RUN, move |_, i| {
                let (es, idx) = (es.clone(), idx.clone());
                let identity = phone(first + i as u64 % UNCACHED);
                async move {
                    let body = ballast_worker::members::search::lookup_body(&[identity]);
                    let response = es.search(SearchParts::Index(&[&idx])).body(body).send().await?;
                    let answer: serde_json::Value = response.json().await?;
                    anyhow::ensure!(answer["hits"]["hits"][0].is_object(), "a loaded phone is found");
                    Ok(())
                }
            })
            .await?,
        );
    }

    // (c) writes: a member's level, through the service and raw.
    let ids = Arc::new(ids);
    let primary = stack.get(ballast_e2e::members::PRIMARY_MYSQL)?;
    let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(&primary)?);
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", stack.get("BALLAST_KAFKA_BOOTSTRAP")?)
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()?;
    let topic = format!("{name}-changes");
    let caches = vec![
        redis::Client::open(stack.get("BALLAST_REDIS_MEMBER_DC_A_URL")?)?
            .get_multiplexed_async_connection()
            .await?,
        redis::Client::open(stack.get("BALLAST_REDIS_MEMBER_DC_B_URL")?)?
            .get_multiplexed_async_connection()
            .await?,
    ];
    let place = |id: u64| stores.primary().db.map().member_place(id).members();
    let tables: Arc<Vec<String>> = Arc::new(ids.iter().map(|id| place(*id)).collect());
    let (mut api_writes, mut raw_writes) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let (c, ids_api) = (Arc::clone(&clients), Arc::clone(&ids));
        api_writes.push(
            support::load(CONCURRENCY, RUN, move |task, i| {
                let mut client = c[task].clone();
                // Each task its own members: writes never wait on one another's row.
                let id = ids_api[(task + CONCURRENCY * (i / CONCURRENCY)) % ids_api.len()];
                async move {
                    client
                        .update(request(UpdateRequest {
                            member_id: id.to_string(),
                            name: None,
                            level: Some(format!("r{run}i{i}")),
                        }))
                        .await?;
                    Ok(())
                }
            })
            .await?,
        );
        let (pool, producer, caches, topic, es, idx, tables, ids_raw) = (
            pool.clone(),
            producer.clone(),
            caches.clone(),
            topic.clone(),
            es.clone(),
            index.index().to_owned(),
            Arc::clone(&tables),
            Arc::clone(&ids),
        );
        let keys = stores.keys.clone();
        raw_writes.push(
            support::load(CONCURRENCY, RUN, move |task, i| {
                let at = (task + CONCURRENCY * (i / CONCURRENCY)) % ids_raw.len();
                let (id, table) = (ids_raw[at], tables[at].clone());
                let (pool, producer, mut caches, topic, es, idx) =
                    (pool.clone(), producer.clone(), caches.clone(), topic.clone(), es.clone(), idx.clone());
                let key = keys.entry(&Key::Member(id));
                async move {
                    let level = format!("raw{run}i{i}");
                    let mut conn = pool.get_conn().await?;
                    let mut tx = conn.start_transaction(mysql_async::TxOpts::default()).await?;
                    tx.exec_drop(format!("UPDATE {table} SET level = ?, version = version + 1 WHERE member_id = ?"), (&level, id))
                        .await?;
                    tx.commit().await?;
                    let doc = serde_json::json!({"memberId": id.to_string(), "name": "raw", "level": level,
                        "phone": [], "unionid": [], "tcCard": [], "elCard": [], "version": 1, "updatedMs": 1});
                    es.index(elasticsearch::IndexParts::IndexId(&idx, &id.to_string()))
                        .routing(&id.to_string())
                        .body(doc.clone())
                        .send()
                        .await?
                        .error_for_status_code()?;
                    let payload = doc.to_string();
                    producer
                        .send(FutureRecord::to(&topic).key(&id.to_string()).payload(&payload), DEADLINE)
                        .await
                        .map_err(|(e, _)| e)?;
                    for conn in &mut caches {
                        let _: i64 = redis::cmd("DEL").arg(&key).query_async(conn).await?;
                    }
                    Ok(())
                }
            })
            .await?,
        );
    }

    let (hits, gets, floor) = (medians(&api_hits), medians(&raw_gets), medians(&floors));
    let (misses, searches) = (medians(&api_misses), medians(&raw_searches));
    let (writes, raw) = (medians(&api_writes), medians(&raw_writes));
    println!(
        "members bench ({MEMBERS} members, concurrency {CONCURRENCY}, medians of {RUNS} runs of {RUN:?})"
    );
    println!("lookup by phone, cache hit (target: 30000/s, p99 under 2 ms):");
    line("through the API", hits);
    line("raw Redis GET of the same entries", gets);
    line("gRPC floor (fixed answer, no work)", floor);
    println!(
        "  ratio {:.2} of raw Redis, {:.2} of the gRPC floor",
        hits.per_second / gets.per_second,
        hits.per_second / floor.per_second
    );
    println!("lookup by phone, cache miss, primary cluster:");
    line("through the API (search, then fill)", misses);
    line("raw Elasticsearch term query", searches);
    println!("  ratio {:.2} of raw", misses.per_second / searches.per_second);
    println!("write (a member's level):");
    line("through the API (MySQL, ES, stream, 2 caches)", writes);
    line("raw (UPDATE, index, produce, 2 DELs)", raw);
    println!("  ratio {:.2} of raw", writes.per_second / raw.per_second);
    Ok(())
}

async fn bulk(
    es: &elasticsearch::Elasticsearch,
    index: &str,
    ops: Vec<BulkOperation<serde_json::Value>>,
) -> anyhow::Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    let response = es.bulk(BulkParts::Index(index)).body(ops).send().await?;
    let answer: serde_json::Value = response.json().await?;
    anyhow::ensure!(
        answer["errors"] == false,
        "bulk load refused: {}",
        answer.to_string().chars().take(300).collect::<String>()
    );
    Ok(())
}
