//! The member store's data (seed 004): members and identities as values,
//! where they live in MySQL (the shard map), their documents and identity
//! claims in Elasticsearch, the two-data-centre cache with its leases, and
//! the change stream. The member role ([`crate::roles::member`]) puts them
//! together.

pub mod cache;
pub mod claims;
pub mod model;
pub mod search;
pub mod shards;
pub mod sql;
pub mod stream;
