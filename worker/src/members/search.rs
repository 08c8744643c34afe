//! The members in Elasticsearch (seed 004's relation store): one document
//! per member, routed by member id, its identities in keyword fields (no
//! text fields, so nothing is analysed twice), found by identity with term
//! queries in filter context (no scoring); several hits are ordered here, not
//! in the cluster. Each document's external version is the member's version
//! under the epoch of the write ([`fenced_version`]), so a store given an
//! older state keeps the newer one, and any write under a newer epoch wins
//! over every write under an older one: a process that has not yet seen a
//! promotion has its writes refused by each document the promoted side has
//! written since.

use std::collections::BTreeSet;
use std::time::Duration;

use elasticsearch::params::{Refresh, VersionType};
use elasticsearch::{BulkOperation, BulkParts, Elasticsearch, GetParts, IndexParts, SearchParts};
use serde_json::{Value, json};

use super::model::{Identity, IdentityKind, Member};
use crate::es::{EsError, checked, found, put_template};

/// Name (and index pattern stem) of the template every member index is made from.
pub const TEMPLATE: &str = "ballast-members";

/// The member index of one store in one cluster.
#[derive(Clone, Debug)]
pub struct MemberIndex {
    es: Elasticsearch,
    index: String,
    deadline: Duration,
}

impl MemberIndex {
    /// The index of MemberStore `name` in `namespace` on `es`; each request
    /// times out after `deadline`.
    pub fn new(es: Elasticsearch, namespace: &str, name: &str, deadline: Duration) -> Self {
        Self {
            es,
            index: index_name(namespace, name),
            deadline,
        }
    }

    /// The index's name.
    pub fn index(&self) -> &str {
        &self.index
    }

    /// Installs (or updates) the template the member indices are made from. Idempotent.
    pub async fn install(&self) -> Result<(), EsError> {
        put_template(&self.es, TEMPLATE, template(), self.deadline).await
    }

    /// Stores `member`, written under `epoch`, unless the index holds a newer
    /// version of it (which is then kept: not an error).
    pub async fn put(&self, member: &Member, epoch: i64) -> Result<(), EsError> {
        self.index_versioned(member, epoch, VersionType::ExternalGte)
            .await
            .map(drop)
    }

    /// Stores each member of `members` (with the epoch it was written under)
    /// unless the index holds a newer version of it, in one bulk request: a
    /// replica's catch-up at the cost of one round trip per batch, not per
    /// member. Fails if any document was refused for another reason.
    pub async fn put_all(&self, members: &[(&Member, i64)]) -> Result<(), EsError> {
        if members.is_empty() {
            return Ok(());
        }
        let operations: Vec<BulkOperation<Value>> = members
            .iter()
            .map(|(member, epoch)| {
                let id = member.id.to_string();
                BulkOperation::index(document(member))
                    .id(&id)
                    .routing(&id)
                    .version(fenced_version(*epoch, member.version))
                    .version_type(VersionType::ExternalGte)
                    .into()
            })
            .collect();
        let response = self
            .es
            .bulk(BulkParts::Index(&self.index))
            .refresh(Refresh::False)
            .request_timeout(self.deadline)
            .body(operations)
            .send()
            .await?;
        let answer = checked(response).await?;
        match bulk_refusal(&answer) {
            None => Ok(()),
            Some((status, reason)) => Err(EsError::Refused { status, reason }),
        }
    }

    /// Stores `member` only if the index holds an older version of it (or
    /// none): of two writers racing from one version, one wins and the
    /// other is told [`Put::Stale`] (Elasticsearch alone, MySQL being down,
    /// orders the writes).
    pub async fn put_next(&self, member: &Member, epoch: i64) -> Result<Put, EsError> {
        self.index_versioned(member, epoch, VersionType::External).await
    }

    async fn index_versioned(
        &self,
        member: &Member,
        epoch: i64,
        version_type: VersionType,
    ) -> Result<Put, EsError> {
        let id = member.id.to_string();
        let response = self
            .es
            .index(IndexParts::IndexId(&self.index, &id))
            .routing(&id)
            .version(fenced_version(epoch, member.version))
            .version_type(version_type)
            .refresh(Refresh::False)
            .request_timeout(self.deadline)
            .body(document(member))
            .send()
            .await?;
        match checked(response).await {
            Ok(_) => Ok(Put::Stored),
            Err(EsError::Refused { status: 409, .. }) => Ok(Put::Stale),
            Err(e) => Err(e),
        }
    }

    /// Member `id` as stored now (a get is real-time: it does not wait for a refresh).
    pub async fn get(&self, id: u64) -> Result<Option<Member>, EsError> {
        let id = id.to_string();
        let response = self
            .es
            .get(GetParts::IndexId(&self.index, &id))
            .routing(&id)
            .request_timeout(self.deadline)
            .send()
            .await?;
        found(response)
            .await?
            .map(|answer| member_of(&answer["_source"]))
            .transpose()
    }

    /// The members each of `identities` is bound to, in order, in one search
    /// (as of the last refresh).
    pub async fn lookup(&self, identities: &[Identity]) -> Result<Vec<Option<Member>>, EsError> {
        if identities.is_empty() {
            return Ok(Vec::new());
        }
        let hits = self.search(lookup_body(identities)).await?;
        Ok(identities.iter().map(|i| owner_of(i, &hits)).collect())
    }

    /// Makes every write so far visible to searches (a search otherwise sees
    /// the index as of its last refresh, up to a second behind).
    pub async fn refresh(&self) -> Result<(), EsError> {
        let response = self
            .es
            .indices()
            .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[&self.index]))
            .allow_no_indices(true)
            .ignore_unavailable(true)
            .request_timeout(self.deadline)
            .send()
            .await?;
        checked(response).await.map(drop)
    }

    /// Up to `size` members changed at `since_ms` or later, after the
    /// `after` cursor (the last page's last `(updated_ms, id)`).
    pub async fn changed_since(
        &self,
        since_ms: i64,
        after: Option<(i64, u64)>,
        size: usize,
    ) -> Result<Vec<Member>, EsError> {
        self.search(changed_body(since_ms, after, size)).await
    }

    /// The members a search of this index finds.
    async fn search(&self, body: Value) -> Result<Vec<Member>, EsError> {
        let response = self
            .es
            .search(SearchParts::Index(&[&self.index]))
            .allow_no_indices(true)
            .ignore_unavailable(true)
            .request_timeout(self.deadline)
            .body(body)
            .send()
            .await?;
        members_of(&checked(response).await?)
    }
}

/// The search of members changed since `since_ms`, sorted by change time
/// and id, resuming after `after`: filter context, no total count. Pure.
pub fn changed_body(since_ms: i64, after: Option<(i64, u64)>, size: usize) -> Value {
    let mut body = json!({
        "size": size,
        "track_total_hits": false,
        "sort": [{ "updatedMs": "asc" }, { "memberId": "asc" }],
        "query": { "bool": { "filter": { "range": { "updatedMs": { "gte": since_ms } } } } }
    });
    if let Some((updated_ms, id)) = after {
        body["search_after"] = json!([updated_ms, id.to_string()]);
    }
    body
}

/// The first refusal of a bulk answer that is not a version conflict (a
/// document the index holds newer is kept: not an error), as its status and
/// reason. Pure.
pub fn bulk_refusal(answer: &Value) -> Option<(u16, String)> {
    if answer["errors"] != Value::Bool(true) {
        return None;
    }
    answer["items"].as_array()?.iter().find_map(|item| {
        let result = item.as_object()?.values().next()?;
        let status = u16::try_from(result["status"].as_u64()?).ok()?;
        let error = &result["error"];
        if (200..300).contains(&status) || status == 409 {
            return None;
        }
        let reason = format!(
            "{}: {}",
            error["type"].as_str().unwrap_or("error"),
            error["reason"].as_str().unwrap_or("refused")
        );
        Some((status, reason))
    })
}

/// What [`MemberIndex::put_next`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    /// The member is stored.
    Stored,
    /// The index holds this version or a newer one: another write won.
    Stale,
}

/// Bits of a fenced version that hold the member's version (a member changed
/// a thousand times a second would need 35 years to exhaust them).
const VERSION_BITS: u32 = 40;

/// The external version of a member at `version` written under `epoch`:
/// the epoch above the member's version, so that every write under a newer
/// epoch outranks every write under an older one, and epoch 0 (no promotion
/// yet) is the member's version itself. Pure.
pub fn fenced_version(epoch: i64, version: u64) -> i64 {
    // Elasticsearch takes versions up to i64::MAX: 23 bits of epoch remain.
    let epoch = epoch.clamp(0, (1 << (63 - VERSION_BITS)) - 1);
    let version = i64::try_from(version.min((1 << VERSION_BITS) - 1)).unwrap_or(0);
    (epoch << VERSION_BITS) | version
}

/// The index of MemberStore `name` in `namespace`. Pure.
pub fn index_name(namespace: &str, name: &str) -> String {
    // Both are DNS labels: lower case, no `.`; the `.` keeps any two pairs apart.
    format!("{TEMPLATE}-{namespace}.{name}")
}

/// The template of the member indices. Pure.
pub fn template() -> Value {
    let keyword = json!({ "type": "keyword" });
    json!({
        "index_patterns": [format!("{TEMPLATE}-*")],
        "template": {
            "settings": {
                "number_of_shards": 2,
                "auto_expand_replicas": "0-1",
                "refresh_interval": "1s"
            },
            "mappings": {
                "dynamic": "strict",
                "_routing": { "required": true },
                "properties": {
                    "memberId": keyword,
                    "name": { "type": "keyword", "index": false },
                    "level": keyword,
                    "phone": keyword,
                    "unionid": keyword,
                    "tcCard": keyword,
                    "elCard": keyword,
                    "version": { "type": "long" },
                    "updatedMs": { "type": "long" }
                }
            }
        }
    })
}

/// The document of `member`: each identity kind a keyword field. Pure.
pub fn document(member: &Member) -> Value {
    let mut doc = json!({
        "memberId": member.id.to_string(),
        "name": member.name,
        "level": member.level,
        "version": member.version,
        "updatedMs": member.updated_ms,
    });
    for kind in IdentityKind::ALL {
        let values: Vec<&str> = member
            .identities
            .iter()
            .filter(|i| i.kind == kind)
            .map(|i| i.value.as_str())
            .collect();
        doc[kind.as_str()] = json!(values);
    }
    doc
}

/// The search for the owners of `identities`: term filters, no scoring, no
/// total count. Pure.
pub fn lookup_body(identities: &[Identity]) -> Value {
    let terms: Vec<Value> = identities
        .iter()
        .map(|i| json!({ "term": { i.kind.as_str(): i.value } }))
        .collect();
    json!({
        "size": identities.len() * 2,
        "track_total_hits": false,
        "query": { "bool": { "filter": { "bool": { "should": terms, "minimum_should_match": 1 } } } }
    })
}

/// The member a document describes. Pure.
pub fn member_of(source: &Value) -> Result<Member, EsError> {
    let id = source["memberId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| EsError::Decode("a member document without memberId".into()))?;
    let mut identities = BTreeSet::new();
    for kind in IdentityKind::ALL {
        for value in source[kind.as_str()].as_array().into_iter().flatten() {
            if let Some(value) = value.as_str() {
                identities.insert(Identity {
                    kind,
                    value: value.to_owned(),
                });
            }
        }
    }
    Ok(Member {
        id,
        name: source["name"].as_str().unwrap_or_default().to_owned(),
        level: source["level"].as_str().unwrap_or_default().to_owned(),
        identities,
        version: source["version"].as_u64().unwrap_or(0),
        updated_ms: source["updatedMs"].as_i64().unwrap_or(0),
    })
}

fn members_of(answer: &Value) -> Result<Vec<Member>, EsError> {
    let hits = answer["hits"]["hits"]
        .as_array()
        .ok_or_else(|| EsError::Decode("no hits in a search answer".into()))?;
    hits.iter().map(|h| member_of(&h["_source"])).collect()
}

/// The owner of `identity` among `hits`: the most recently changed member
/// holding it (two can, for a moment, when one unbinds and another binds it
/// within a refresh). Pure.
pub fn owner_of(identity: &Identity, hits: &[Member]) -> Option<Member> {
    hits.iter()
        .filter(|m| m.identities.contains(identity))
        .max_by_key(|m| (m.updated_ms, m.version))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bulk_answer_is_refused_only_for_what_is_not_a_version_conflict() {
        let item = |status: u64| json!({"index": {"status": status, "error": {"type": "t", "reason": "r"}}});
        let table = [
            (json!({"errors": false, "items": [item(201)]}), None),
            (json!({"errors": true, "items": [item(201), item(409)]}), None),
            (
                json!({"errors": true, "items": [item(409), item(429)]}),
                Some((429, "t: r".to_owned())),
            ),
            (
                json!({"errors": true, "items": [item(400)]}),
                Some((400, "t: r".to_owned())),
            ),
        ];
        for (answer, want) in table {
            assert_eq!(bulk_refusal(&answer), want, "{answer}");
        }
    }

    #[test]
    fn a_write_under_a_newer_epoch_outranks_every_write_under_an_older_one() {
        // (epoch, version) pairs in the order Elasticsearch must rank them.
        let ranked = [
            (0, 1),
            (0, 2),
            (0, 1_000_000),
            (1, 1),
            (1, 2),
            (2, 1),
            (7, 1 << 39),
        ];
        for pair in ranked.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                fenced_version(a.0, a.1) < fenced_version(b.0, b.1),
                "{a:?} !< {b:?}"
            );
        }
        assert_eq!(
            fenced_version(0, 42),
            42,
            "no promotion yet: the member's version"
        );
        assert_eq!(fenced_version(-3, 42), 42, "a negative epoch counts as none");
        assert!(
            fenced_version(i64::MAX, u64::MAX) > 0,
            "never past Elasticsearch's range"
        );
    }

    fn identity(kind: IdentityKind, value: &str) -> Identity {
        Identity {
            kind,
            value: value.into(),
        }
    }

    fn member(id: u64, updated_ms: i64, identities: &[Identity]) -> Member {
        Member {
            id,
            name: "n".into(),
            level: "gold".into(),
            identities: identities.iter().cloned().collect(),
            version: 2,
            updated_ms,
        }
    }

    #[test]
    fn a_document_round_trips_to_the_member() -> Result<(), EsError> {
        let m = member(
            42,
            7,
            &[
                identity(IdentityKind::Phone, "13812345678"),
                identity(IdentityKind::TongchengCard, "123456"),
                identity(IdentityKind::TongchengCard, "654321"),
            ],
        );
        let doc = document(&m);
        assert_eq!(doc["tcCard"], json!(["123456", "654321"]));
        assert_eq!(doc["unionid"], json!([]));
        assert_eq!(member_of(&doc)?, m);
        Ok(())
    }

    #[test]
    fn a_lookup_is_term_filters_without_scoring() {
        let body = lookup_body(&[identity(IdentityKind::Phone, "13812345678")]);
        assert_eq!(
            body["query"]["bool"]["filter"]["bool"]["should"][0],
            json!({"term": {"phone": "13812345678"}})
        );
        assert!(body["query"]["bool"].get("must").is_none());
    }

    #[test]
    fn the_owner_is_the_latest_member_holding_the_identity() {
        let phone = identity(IdentityKind::Phone, "13812345678");
        let card = identity(IdentityKind::ElongCard, "123456");
        let hits = [
            member(1, 10, std::slice::from_ref(&phone)),
            member(2, 20, std::slice::from_ref(&phone)),
            member(3, 30, std::slice::from_ref(&card)),
        ];
        assert_eq!(owner_of(&phone, &hits).map(|m| m.id), Some(2));
        assert_eq!(owner_of(&card, &hits).map(|m| m.id), Some(3));
        assert_eq!(
            owner_of(&identity(IdentityKind::Phone, "13900000000"), &hits),
            None
        );
    }

    #[test]
    fn a_sweep_pages_by_change_time_and_id_from_a_time() {
        let first = changed_body(1_000, None, 500);
        assert_eq!(
            first["query"]["bool"]["filter"]["range"]["updatedMs"]["gte"],
            1_000
        );
        assert!(first.get("search_after").is_none());
        let next = changed_body(1_000, Some((1_200, 42)), 500);
        assert_eq!(next["search_after"], json!([1_200, "42"]));
    }

    #[test]
    fn index_names_of_two_stores_never_meet() {
        assert_ne!(index_name("a-b", "c"), index_name("a", "b-c"));
        assert!(index_name("ns", "ms").starts_with(TEMPLATE));
    }
}
