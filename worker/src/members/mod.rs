//! The member store's data (seed 004): members and identities as values,
//! where they live in MySQL (the shard map), their documents and identity
//! claims in Elasticsearch, the two-data-centre cache with its leases, and
//! the change stream, its consumers and the replicas it keeps. The member
//! role ([`crate::roles::member`]) and the replicator
//! ([`crate::roles::replicator`]) put them together.

pub mod cache;
pub mod claims;
pub mod consume;
pub mod model;
pub mod replica;
pub mod search;
pub mod shards;
pub mod sql;
pub mod stream;
