//! What the member scenarios share: a MemberStore with a member process in
//! each data centre, callers of its gRPC API, and identities no other run uses.

use std::time::Duration;

use anyhow::Context;
use ballast_e2e::members::MemberProcess;
use ballast_e2e::scenario::until_ready;
use ballast_e2e::{Stack, install_crds, pipeline_namespace, worker_binary};
use ballast_worker::roles::{Deps, replicator};
use ballast_worker::wire::members_client::MembersClient;
use ballast_worker::wire::{
    BindRequest, GetRequest, Identity, IdentityKind, LookupRequest, Member, RegisterRequest, UpdateRequest,
    WriteReply,
};
use kube::api::{Api, Patch, PatchParams};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// A replicator running in the test's process.
pub type Replicating = tokio::task::JoinHandle<Result<(), replicator::Error>>;

/// A MemberStore and its two member processes.
pub struct Fixture {
    pub stack: Stack,
    pub namespace: String,
    pub name: String,
    pub home: String,
    pub a: MemberProcess,
    pub b: MemberProcess,
}

impl Fixture {
    /// A fresh MemberStore `<prefix><pid>` in its own namespace, with a
    /// member process in dc-a and in dc-b, both ready.
    pub async fn start(prefix: &str) -> anyhow::Result<Self> {
        let stack = Stack::discover();
        let client = stack.kube_client().await?;
        install_crds(&client).await?;
        let namespace = pipeline_namespace(&client, prefix).await?;
        let name = format!("{prefix}{}", ballast_e2e::run_id());
        let home = format!("m_{}", name.replace('-', "_"));
        stack.member_home(&home).await?;
        let mut store = stack.member_store(&name, &home)?;
        // Three known callers (one held to a request a second), and no rate
        // for unlisted ones: a stranger is refused.
        store["spec"]["flowControl"] = serde_json::json!({
            "globalRatePerSecond": 100_000,
            "hotKeyRatePerSecond": 100_000,
            "callers": [
                {"caller": "orders", "ratePerSecond": 100_000},
                {"caller": "campaign", "ratePerSecond": 100_000},
                {"caller": "trickle", "ratePerSecond": 1},
            ],
        });
        Api::<ballast_crds::MemberStore>::namespaced(client, &namespace)
            .patch(
                &name,
                &PatchParams::apply("ballast-e2e").force(),
                &Patch::Apply(&store),
            )
            .await?;
        let binary = worker_binary()?;
        let a = stack.member(&binary, &namespace, &name, "dc-a", &[])?;
        let b = stack.member(&binary, &namespace, &name, "dc-b", &[])?;
        until_ready(a.metrics, 120).await?;
        until_ready(b.metrics, 120).await?;
        Ok(Self {
            stack,
            namespace,
            name,
            home,
            a,
            b,
        })
    }

    /// A caller of data centre `dc`'s process (`a` or `b`).
    pub async fn caller(&self, dc: char, account: &str, class: &str) -> anyhow::Result<Caller> {
        let port = if dc == 'a' { self.a.grpc } else { self.b.grpc };
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .context("connecting to a member process")?;
        Ok(Caller {
            client: MembersClient::new(channel),
            account: account.into(),
            class: class.into(),
        })
    }

    /// Runs the operator on the store's namespace, probing each data centre
    /// every second (1 s timeout; 2 lost probes find a server down, 2
    /// answers back up).
    pub async fn operate(&self) -> anyhow::Result<ballast_e2e::KillOnDrop> {
        let client = self.stack.kube_client().await?;
        let fast = serde_json::json!({"spec": {"promotion": {
            "probe": {"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2, "successThreshold": 2},
        }}});
        Api::<ballast_crds::MemberStore>::namespaced(client, &self.namespace)
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&fast))
            .await?;
        Ok(self
            .stack
            .operator(&ballast_e2e::binary("ballast-operator")?, &self.namespace)
            .await?)
    }

    /// Runs a replicator of the store in this process, as its Deployment
    /// would: it keeps DC B's and the marketing cluster from the change
    /// stream until the returned token is cancelled.
    pub async fn replicate(&self) -> anyhow::Result<(CancellationToken, Replicating)> {
        let port = ballast_e2e::scenario::free_port()?;
        let shutdown = CancellationToken::new();
        let config = replicator::Config {
            namespace: self.namespace.clone(),
            store: self.name.clone(),
            metrics: format!("127.0.0.1:{port}").parse()?,
            deadline: Duration::from_secs(2),
            drain: Duration::from_secs(5),
            es_credentials: None,
        };
        let deps = Deps {
            client: self.stack.kube_client().await?,
        };
        Ok((
            shutdown.clone(),
            tokio::spawn(replicator::run(config, deps, shutdown)),
        ))
    }

    /// The cache key of member `id`'s entry.
    pub fn member_key(&self, id: &str) -> String {
        format!("ballast:members:{}/{}:m:{id}", self.namespace, self.name)
    }
}

/// A caller account and class, and a client.
#[derive(Clone)]
pub struct Caller {
    pub client: MembersClient<Channel>,
    pub account: String,
    pub class: String,
}

impl Caller {
    /// `message` with this caller's metadata.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        // An empty account stands for a request that carries none.
        if !self.account.is_empty()
            && let Ok(v) = self.account.parse()
        {
            metadata.insert("x-ballast-caller", v);
        }
        if let Ok(v) = self.class.parse() {
            metadata.insert("x-ballast-caller-class", v);
        }
        request
    }

    pub async fn register(&self, name: &str, identities: Vec<Identity>) -> Result<WriteReply, Status> {
        let request = self.request(RegisterRequest {
            name: name.into(),
            level: "silver".into(),
            identities,
        });
        Ok(self.client.clone().register(request).await?.into_inner())
    }

    pub async fn bind(&self, id: &str, identity: Identity) -> Result<WriteReply, Status> {
        let request = self.request(BindRequest {
            member_id: id.into(),
            identity: Some(identity),
        });
        Ok(self.client.clone().bind(request).await?.into_inner())
    }

    pub async fn unbind(&self, id: &str, identity: Identity) -> Result<WriteReply, Status> {
        let request = self.request(BindRequest {
            member_id: id.into(),
            identity: Some(identity),
        });
        Ok(self.client.clone().unbind(request).await?.into_inner())
    }

    pub async fn level(&self, id: &str, level: &str) -> Result<WriteReply, Status> {
        let request = self.request(UpdateRequest {
            member_id: id.into(),
            name: None,
            level: Some(level.into()),
        });
        Ok(self.client.clone().update(request).await?.into_inner())
    }

    pub async fn get(&self, id: &str, read_after: &str) -> Result<Member, Status> {
        let request = self.request(GetRequest {
            member_id: id.into(),
            read_after: read_after.into(),
        });
        Ok(self.client.clone().get(request).await?.into_inner())
    }

    pub async fn lookup(&self, identity: Identity) -> Result<Option<Member>, Status> {
        let request = self.request(LookupRequest {
            identity: Some(identity),
        });
        Ok(self.client.clone().lookup(request).await?.into_inner().member)
    }
}

/// Phone number `n` of this run (11 digits, unique per process).
pub fn phone(n: u64) -> Identity {
    Identity {
        kind: IdentityKind::Phone.into(),
        value: format!("139{:04}{:04}", ballast_e2e::run_id() % 10_000, n % 10_000),
    }
}

/// eLong card `n` of this run.
pub fn card(n: u64) -> Identity {
    Identity {
        kind: IdentityKind::ElongCard.into(),
        value: format!("{}{:06}", ballast_e2e::run_id(), n),
    }
}

/// The member id a write's reply names.
pub fn id_of(reply: &WriteReply) -> String {
    reply
        .member
        .as_ref()
        .map(|m| m.member_id.clone())
        .unwrap_or_default()
}

/// The `query_total` of searches Elasticsearch at `url` has run on `index`.
pub async fn searches(url: &str, index: &str) -> anyhow::Result<u64> {
    let es = ballast_worker::connect::elasticsearch(url, None)?;
    let response = es
        .indices()
        .stats(elasticsearch::indices::IndicesStatsParts::IndexMetric(
            &[index],
            &["search"],
        ))
        .send()
        .await?;
    let body: serde_json::Value = response.json().await?;
    body["indices"][index]["total"]["search"]["query_total"]
        .as_u64()
        .with_context(|| format!("no search stats for {index}: {body}"))
}

/// Waits up to `secs` until the member process serving metrics on `port`
/// reports path `code` (`ballast_member_path`: 0 MySQL, 1 catch-up, 2
/// Elasticsearch).
pub async fn until_path(port: u16, code: f64, secs: u64) -> anyhow::Result<()> {
    ballast_e2e::scenario::eventually(&format!("ballast_member_path {code}"), secs, || async {
        let path = ballast_e2e::scenario::metric(port, "ballast_member_path").await?;
        Ok::<_, std::io::Error>((path == Some(code)).then_some(()))
    })
    .await?;
    Ok(())
}
