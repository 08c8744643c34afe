//! The member service (`ballast-worker member`) against the real servers of
//! both member data centres: MySQL primary and replica, each DC's Redis and
//! Elasticsearch, Kafka, the API server holding the MemberStore. A member
//! process runs in each data centre, as its pods would.
//!
//! Every scenario here stops a server, replication, or needs both DCs whole:
//! they run one at a time.

mod api;
mod caches;
mod faults;
mod mysql;
mod promotion;
mod support;
mod traffic;

/// Held by each scenario for its whole run.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
