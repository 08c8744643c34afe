//! Leader election on a `coordination.k8s.io/v1` Lease: of the operator's
//! replicas, or a pipeline's masters, only the holder acts; the others wait to take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

/// Errors of the election that a caller acts on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a Lease request.
    #[error("lease {name}: {source}")]
    Api {
        /// Name of the Lease.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Where the Lease is and who competes for it.
#[derive(Clone, Debug)]
pub struct Election {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a holder keeps the Lease without renewing.
    pub duration: Duration,
}

/// Whether `lease` may be taken by `identity` at `now`: free, expired, or already ours. Pure.
pub fn may_take(lease: &Lease, identity: &str, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    match (
        &spec.holder_identity,
        &spec.renew_time,
        spec.lease_duration_seconds,
    ) {
        (Some(holder), _, _) if holder == identity => true,
        (Some(_), Some(renewed), Some(seconds)) => {
            now.duration_since(renewed.0) >= SignedDuration::from_secs(i64::from(seconds))
        }
        _ => true,
    }
}

impl Election {
    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: transitions,
            ..LeaseSpec::default()
        }
    }

    /// Tries once to take or renew the Lease; true when this replica holds it.
    pub async fn try_acquire(&self, client: &kube::Client) -> Result<bool, Error> {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let err = |source| Error::Api {
            name: self.name.clone(),
            source,
        };
        let now = Timestamp::now();
        let Some(mut lease) = api.get_opt(&self.name).await.map_err(err)? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, None, Some(0))),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false), // another replica created it first
                Err(e) => Err(err(e)),
            };
        };
        if !may_take(&lease, &self.identity, now) {
            return Ok(false);
        }
        let previous = lease.spec.clone().unwrap_or_default();
        let ours = previous.holder_identity.as_deref() == Some(&self.identity);
        let (acquired, transitions) = if ours {
            (previous.acquire_time, previous.lease_transitions)
        } else {
            (None, Some(previous.lease_transitions.unwrap_or(0) + 1))
        };
        lease.spec = Some(self.spec(now, acquired, transitions));
        // The resourceVersion in `lease` makes this a compare-and-swap: a
        // concurrent taker gets 409 Conflict and stays a follower.
        match api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// The Lease's term: how many times it changed hands. Each new holder
    /// counts one more, so a term fences everything an older holder stamped.
    pub async fn term(&self, client: &kube::Client) -> Result<i64, Error> {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let lease = api.get(&self.name).await.map_err(|source| Error::Api {
            name: self.name.clone(),
            source,
        })?;
        Ok(lease.spec.and_then(|s| s.lease_transitions).map_or(0, i64::from))
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self, client: &kube::Client, shutdown: &CancellationToken) -> Result<(), Error> {
        loop {
            if self.try_acquire(client).await? {
                return Ok(());
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.duration / 4) => {}
            }
        }
    }

    /// Renews the Lease until `shutdown`; cancels `lost` when it could not be
    /// renewed within its duration, so that this replica stops acting.
    pub async fn hold(self, client: kube::Client, shutdown: CancellationToken, lost: CancellationToken) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.duration / 3) => {}
            }
            match self.try_acquire(&client).await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "leadership taken by another replica");
                    lost.cancel();
                    return;
                }
                Err(error) => tracing::warn!(%error, "renewing the leader lease failed"),
            }
            if last_renewal.elapsed() >= self.duration {
                tracing::error!(lease = %self.name, "leader lease not renewed within its duration");
                lost.cancel();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: Option<i64>, seconds: Option<i32>) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: renewed.map(|s| MicroTime(Timestamp::from_second(s).expect("valid"))),
                lease_duration_seconds: seconds,
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn lease_may_be_taken_when_free_expired_or_ours() {
        let now = Timestamp::from_second(100).expect("valid");
        let cases = [
            (lease(None, None, None), true, "free"),
            (lease(Some("me"), Some(99), Some(15)), true, "ours"),
            (lease(Some("other"), Some(90), Some(15)), false, "held"),
            (lease(Some("other"), Some(85), Some(15)), true, "expired exactly"),
            (lease(Some("other"), Some(10), Some(15)), true, "long expired"),
        ];
        for (lease, want, name) in cases {
            assert_eq!(may_take(&lease, "me", now), want, "{name}");
        }
    }
}
