//! Writes and lookups running through both data centres' member processes
//! while a scenario fails a server: what was acknowledged (each member's
//! latest state), when, and when lookups were answered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use ballast_e2e::scenario::eventually;
use ballast_worker::members::model;
use ballast_worker::wire::Member;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::support::{Caller, card, id_of};

/// Whether a refusal is one a caller retries (a dependency down, a race, a limit).
pub fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Aborted | Code::ResourceExhausted)
}

/// What the writer acknowledged and the lookups answered.
#[derive(Clone, Default)]
pub struct Traffic {
    /// Each member's latest acknowledged state.
    pub acknowledged: BTreeMap<String, Member>,
    /// When each write was acknowledged.
    pub acked_at: Vec<Instant>,
    /// When each lookup was answered.
    pub read_at: Vec<Instant>,
    /// Writes the client gave up on after its timeout.
    pub unanswered: usize,
}

impl Traffic {
    fn acked_since(&self, t: Instant) -> usize {
        self.acked_at.iter().filter(|a| **a >= t).count()
    }

    /// What differs from what was acknowledged, one line per problem: each
    /// acknowledged member must be on side A (as `read` gives both sides of
    /// a member id) at its acknowledged version or later, and equal on side B.
    pub async fn differences<F, Fut>(&self, read: F) -> anyhow::Result<Vec<String>>
    where
        F: Fn(u64) -> Fut,
        Fut: Future<Output = anyhow::Result<(Option<model::Member>, Option<model::Member>)>>,
    {
        let mut differ = Vec::new();
        for (id, member) in &self.acknowledged {
            let (a, b) = read(id.parse()?).await?;
            if a.as_ref().is_none_or(|m| m.version < member.version) {
                differ.push(format!(
                    "{id}: acknowledged version {}, side A has {a:?}",
                    member.version
                ));
            }
            if a != b {
                differ.push(format!("{id}: side A {a:?}, side B {b:?}"));
            }
        }
        Ok(differ)
    }

    /// Lookups answered between `from` and `to`.
    pub fn read_between(&self, from: Instant, to: Instant) -> usize {
        self.read_at.iter().filter(|r| **r >= from && **r <= to).count()
    }
}

/// The traffic running, until [`Running::finish`].
pub struct Running {
    traffic: Arc<Mutex<Traffic>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Starts writing and looking up through `a` and `b` in turn.
    pub fn start(a: Caller, b: Caller) -> Self {
        let traffic = Arc::new(Mutex::new(Traffic::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(a, b, Arc::clone(&traffic), Arc::clone(&stop)));
        Self { traffic, stop, task }
    }

    /// What it has done so far.
    pub fn so_far(&self) -> Traffic {
        self.traffic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits up to `secs` until `n` writes were acknowledged since `since`;
    /// fails at once if the traffic stopped (a write refused for good).
    pub async fn until_acked(&self, what: &str, since: Instant, n: usize, secs: u64) -> anyhow::Result<()> {
        eventually(what, secs, || async {
            anyhow::ensure!(!self.task.is_finished(), "the traffic stopped");
            Ok((self.so_far().acked_since(since) >= n).then_some(()))
        })
        .await?;
        Ok(())
    }

    /// Stops it; what it did, or why it stopped before.
    pub async fn finish(self) -> anyhow::Result<Traffic> {
        let Self { traffic, stop, task } = self;
        stop.store(true, Ordering::Relaxed);
        task.await??;
        Ok(traffic.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// Writes (a registration in four, else a level update of a member it
/// registered) and looks up through `a` and `b` in turn until `stop`; a
/// write refused as one to retry is not acknowledged, and is not retried.
async fn run(
    a: Caller,
    b: Caller,
    traffic: Arc<Mutex<Traffic>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let record =
        |f: &mut dyn FnMut(&mut Traffic)| f(&mut traffic.lock().unwrap_or_else(PoisonError::into_inner));
    let mut ids: Vec<String> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let caller = if n.is_multiple_of(2) { &a } else { &b };
        let registering = n % 4 == 1 || ids.is_empty();
        let written = if registering {
            caller.register(&format!("m{n}"), vec![card(60_000 + n)]).await
        } else {
            let id = &ids[usize::try_from(n).unwrap_or(0) % ids.len()];
            caller.level(id, &format!("l{n}")).await
        };
        match written {
            Ok(reply) => {
                let member = reply.member.clone().context("a reply without its member")?;
                if registering {
                    ids.push(id_of(&reply));
                }
                record(&mut |t| {
                    t.acked_at.push(Instant::now());
                    let newer = t
                        .acknowledged
                        .get(&member.member_id)
                        .is_none_or(|m| m.version <= member.version);
                    if newer {
                        t.acknowledged.insert(member.member_id.clone(), member.clone());
                    }
                });
            }
            Err(s) if retryable(s.code()) => tokio::time::sleep(Duration::from_millis(50)).await,
            // No answer within the client's timeout: not acknowledged either
            // way, and counted, since the service's deadlines should prevent it.
            Err(s) if matches!(s.code(), Code::Cancelled | Code::DeadlineExceeded) => {
                record(&mut |t| t.unanswered += 1);
            }
            Err(s) => anyhow::bail!("write {n}: {s}"),
        }
        if let Some(id) = ids.last()
            && caller.get(id, "").await.is_ok()
        {
            record(&mut |t| t.read_at.push(Instant::now()));
        }
    }
    Ok(())
}
