//! Which member each identity is bound to, in Elasticsearch: one document
//! per identity, its id the identity itself, so that creating it is atomic
//! (two members binding one identity: one creates, the other is told who
//! owns it). MySQL's identity tables keep identities unique normally; these
//! documents, written beside them, keep them unique while MySQL is down.

use std::time::Duration;

use elasticsearch::params::{OpType, Refresh};
use elasticsearch::{DeleteParts, Elasticsearch, GetParts, IndexParts};
use serde_json::{Value, json};

use super::model::Identity;
use crate::es::{EsError, checked, found, put_template};

/// Name (and index pattern stem) of the claims' template.
pub const TEMPLATE: &str = "ballast-claims";

/// The claims of one store in one cluster.
#[derive(Clone, Debug)]
pub struct Claims {
    es: Elasticsearch,
    index: String,
    deadline: Duration,
}

/// What a claim found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The identity is now (or was already) bound to the claimant.
    Held,
    /// Another member holds it.
    HeldBy(u64),
}

impl Claims {
    /// The claims of MemberStore `name` in `namespace`; each request times out after `deadline`.
    pub fn new(es: Elasticsearch, namespace: &str, name: &str, deadline: Duration) -> Self {
        Self {
            es,
            index: format!("{TEMPLATE}-{namespace}.{name}"),
            deadline,
        }
    }

    /// Installs the template the claims indices are made from. Idempotent.
    pub async fn install(&self) -> Result<(), EsError> {
        put_template(&self.es, TEMPLATE, template(), self.deadline).await
    }

    /// Binds `identity` to `member` unless another member holds it.
    pub async fn claim(&self, identity: &Identity, member: u64) -> Result<Claim, EsError> {
        let id = doc_id(identity);
        // A claim released between the create and the get is tried again, a few times.
        for _ in 0..3 {
            let response = self
                .es
                .index(IndexParts::IndexId(&self.index, &id))
                .op_type(OpType::Create)
                .refresh(Refresh::False)
                .request_timeout(self.deadline)
                .body(json!({ "memberId": member.to_string() }))
                .send()
                .await?;
            match checked(response).await {
                Ok(_) => return Ok(Claim::Held),
                Err(EsError::Refused { status: 409, .. }) => match self.owner(identity).await? {
                    Some(owner) if owner != member => return Ok(Claim::HeldBy(owner)),
                    Some(_) => return Ok(Claim::Held),
                    None => {}
                },
                Err(e) => return Err(e),
            }
        }
        Err(EsError::Refused {
            status: 409,
            reason: format!("{identity} is being claimed and released by others; retry"),
        })
    }

    /// Records `identity` as bound to `member`, whoever held it (MySQL decided).
    pub async fn set(&self, identity: &Identity, member: u64) -> Result<(), EsError> {
        let response = self
            .es
            .index(IndexParts::IndexId(&self.index, &doc_id(identity)))
            .refresh(Refresh::False)
            .request_timeout(self.deadline)
            .body(json!({ "memberId": member.to_string() }))
            .send()
            .await?;
        checked(response).await.map(drop)
    }

    /// Unbinds `identity` if `member` holds it.
    pub async fn release(&self, identity: &Identity, member: u64) -> Result<(), EsError> {
        let id = doc_id(identity);
        let Some((owner, seq_no, primary_term)) = self.read(&id).await? else {
            return Ok(());
        };
        if owner != member {
            return Ok(());
        }
        let response = self
            .es
            .delete(DeleteParts::IndexId(&self.index, &id))
            .if_seq_no(seq_no)
            .if_primary_term(primary_term)
            .request_timeout(self.deadline)
            .send()
            .await?;
        match checked(response).await {
            // Gone, or claimed again meanwhile (by whoever it now belongs to).
            Ok(_)
            | Err(EsError::Refused {
                status: 404 | 409, ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The member holding `identity`, if any (a get: real-time).
    pub async fn owner(&self, identity: &Identity) -> Result<Option<u64>, EsError> {
        Ok(self.read(&doc_id(identity)).await?.map(|(owner, _, _)| owner))
    }

    async fn read(&self, id: &str) -> Result<Option<(u64, i64, i64)>, EsError> {
        let response = self
            .es
            .get(GetParts::IndexId(&self.index, id))
            .request_timeout(self.deadline)
            .send()
            .await?;
        Ok(found(response).await?.as_ref().and_then(owner_of))
    }
}

/// The document id of an identity: its kind and value. Pure.
pub fn doc_id(identity: &Identity) -> String {
    format!("{}:{}", identity.kind.as_str(), identity.value)
}

/// The owner, sequence number and primary term of a found claim's get answer. Pure.
fn owner_of(answer: &Value) -> Option<(u64, i64, i64)> {
    let owner = answer["_source"]["memberId"].as_str()?.parse().ok()?;
    Some((
        owner,
        answer["_seq_no"].as_i64()?,
        answer["_primary_term"].as_i64()?,
    ))
}

/// The claims' template: one keyword, not indexed (claims are only got by id). Pure.
pub fn template() -> Value {
    json!({
        "index_patterns": [format!("{TEMPLATE}-*")],
        "template": {
            "settings": { "number_of_shards": 2, "auto_expand_replicas": "0-1" },
            "mappings": {
                "dynamic": "strict",
                "properties": { "memberId": { "type": "keyword", "index": false } }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::model::IdentityKind;

    #[test]
    fn a_claim_is_found_by_its_identity_and_read_with_its_sequence() {
        let phone = Identity {
            kind: IdentityKind::Phone,
            value: "13812345678".into(),
        };
        assert_eq!(doc_id(&phone), "phone:13812345678");
        let answer = json!({"found": true, "_seq_no": 4, "_primary_term": 1,
                            "_source": {"memberId": "77"}});
        assert_eq!(owner_of(&answer), Some((77, 4, 1)));
        assert_eq!(owner_of(&json!({"_seq_no": 4})), None, "no owner, no claim");
    }
}
