//! `ballast.v1.Members` over gRPC: each call's caller identified from its
//! metadata and admitted by flow control, its message checked and turned
//! into model values, the operation run, and every failure answered with
//! the status a caller can act on, counted by method and code.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Code, Request, Response, Status};

use super::caller::{self, Caller, CallerError};
use super::service::{Failure, Members};
use super::write::Done;
use crate::members::model::{
    self, Change, Conflict, Identity, IdentityKind, Invalid, MAX_IDENTITIES, Member,
};
use crate::wire;

/// Identities one lookup call may ask about.
pub const MAX_LOOKUPS: usize = 100;

/// The gRPC face of [`Members`].
pub struct MemberApi {
    members: Arc<Members>,
}

impl MemberApi {
    /// The API over `members`.
    pub fn new(members: Arc<Members>) -> Self {
        Self { members }
    }

    /// The tonic service, with a small message limit (a member call is a
    /// few hundred bytes; a larger one is refused before it is decoded).
    pub fn service(self) -> wire::members_server::MembersServer<Self> {
        wire::members_server::MembersServer::new(self).max_decoding_message_size(64 * 1024)
    }

    /// Runs `op` for the caller of `request` once admitted (about `key`, a
    /// member id or identity, for the hot-key limit), and answers.
    async fn serve<M, T, F, Fut>(
        &self,
        method: &'static str,
        request: &Request<M>,
        key: Option<&str>,
        op: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(Caller) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let started = Instant::now();
        let metadata = request.metadata();
        let text = |name| metadata.get(name).and_then(|v| v.to_str().ok());
        let outcome = async {
            let caller = caller::identify(text(caller::ACCOUNT), text(caller::CLASS))?;
            let _admission = self.members.admit(&caller, key)?;
            op(caller).await
        }
        .await;
        let metrics = &self.members.metrics;
        metrics.duration.observe(started.elapsed().as_secs_f64());
        let answer = outcome.map_err(|failure| {
            if let Some(reason) = invalid_reason(&failure) {
                metrics.invalid.get_or_create(&[("reason", reason)]).inc();
            }
            status(failure)
        });
        let code = match &answer {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        metrics
            .requests
            .get_or_create(&[("method", method), ("code", code_name(code))])
            .inc();
        answer.map(Response::new)
    }
}

impl MemberApi {
    /// A bind or an unbind (`change` of the identity the request names).
    async fn change_binding(
        &self,
        method: &'static str,
        request: Request<wire::BindRequest>,
        change: fn(Identity) -> Change,
    ) -> Result<Response<wire::WriteReply>, Status> {
        let key = request.get_ref().member_id.clone();
        self.serve(method, &request, Some(&key), |_| async {
            let r = request.get_ref();
            let id = model::parse_member_id(&r.member_id)?;
            let identity = identity(r.identity.as_ref())?;
            self.members.write(id, change(identity)).await.map(reply)
        })
        .await
    }
}

/// The status a failure answers with. Pure.
pub fn status(failure: Failure) -> Status {
    match failure {
        Failure::Invalid(e) => Status::invalid_argument(e.to_string()),
        Failure::Caller(e) => match e {
            CallerError::Missing(_) => Status::unauthenticated(e.to_string()),
            CallerError::Unknown(_) => Status::permission_denied(e.to_string()),
            CallerError::Malformed | CallerError::Class(_) => Status::invalid_argument(e.to_string()),
        },
        Failure::Conflict(c) => match c {
            Conflict::NoMember(_) => Status::not_found(c.to_string()),
            Conflict::BoundElsewhere { .. } => Status::already_exists(c.to_string()),
            Conflict::Full(_) => Status::failed_precondition(c.to_string()),
            Conflict::IdTaken(_) => Status::aborted(c.to_string()),
        },
        Failure::Refused(refusal) => refusal.into(),
        // The process is moving to the promoted side: a retry goes there.
        Failure::Unavailable { .. } | Failure::Fenced { .. } => Status::unavailable(failure.to_string()),
        Failure::Contended(_) => Status::aborted(failure.to_string()),
    }
}

fn invalid_reason(failure: &Failure) -> Option<&'static str> {
    match failure {
        Failure::Invalid(e) => Some(e.reason()),
        Failure::Caller(e) => Some(e.reason()),
        _ => None,
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::InvalidArgument => "invalid_argument",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unavailable => "unavailable",
        _ => "other",
    }
}

/// A wire identity as a valid one, or why not. Pure.
pub fn identity(wire: Option<&wire::Identity>) -> Result<Identity, Invalid> {
    let wire = wire.ok_or(Invalid::NoIdentity)?;
    let kind = match wire::IdentityKind::try_from(wire.kind) {
        Ok(wire::IdentityKind::Phone) => IdentityKind::Phone,
        Ok(wire::IdentityKind::WechatUnionid) => IdentityKind::WechatUnionid,
        Ok(wire::IdentityKind::TongchengCard) => IdentityKind::TongchengCard,
        Ok(wire::IdentityKind::ElongCard) => IdentityKind::ElongCard,
        Ok(wire::IdentityKind::Unspecified) | Err(_) => return Err(Invalid::Kind(wire.kind)),
    };
    Identity::parse(kind, &wire.value)
}

/// Wire identities as valid ones (at most `max`, else `TooMany` naming `what`), or why not. Pure.
pub fn identities(wire: &[wire::Identity], max: usize, what: &'static str) -> Result<Vec<Identity>, Invalid> {
    if wire.len() > max {
        return Err(Invalid::TooMany {
            what,
            given: wire.len(),
            max,
        });
    }
    wire.iter().map(|i| identity(Some(i))).collect()
}

fn to_wire_identity(identity: &Identity) -> wire::Identity {
    let kind = match identity.kind {
        IdentityKind::Phone => wire::IdentityKind::Phone,
        IdentityKind::WechatUnionid => wire::IdentityKind::WechatUnionid,
        IdentityKind::TongchengCard => wire::IdentityKind::TongchengCard,
        IdentityKind::ElongCard => wire::IdentityKind::ElongCard,
    };
    wire::Identity {
        kind: kind.into(),
        value: identity.value.clone(),
    }
}

/// A member as the wire carries it. Pure.
pub fn to_wire(member: &Member) -> wire::Member {
    wire::Member {
        member_id: member.id.to_string(),
        name: member.name.clone(),
        level: member.level.clone(),
        identities: member.identities.iter().map(to_wire_identity).collect(),
        version: member.version,
        updated_ms: member.updated_ms,
    }
}

fn reply(done: Done) -> wire::WriteReply {
    wire::WriteReply {
        member: Some(to_wire(&done.member)),
        read_after: done.read_after.unwrap_or_default(),
    }
}

fn read_after(token: &str) -> Option<&str> {
    Some(token).filter(|t| !t.is_empty())
}

#[tonic::async_trait]
impl wire::members_server::Members for MemberApi {
    async fn register(
        &self,
        request: Request<wire::RegisterRequest>,
    ) -> Result<Response<wire::WriteReply>, Status> {
        self.serve("register", &request, None, |_| async {
            let r = request.get_ref();
            let change = Change::Register {
                name: model::parse_name(&r.name)?,
                level: model::parse_level(&r.level)?,
                identities: identities(&r.identities, MAX_IDENTITIES, "identities")?
                    .into_iter()
                    .collect::<BTreeSet<_>>(),
            };
            self.members.register(change).await.map(reply)
        })
        .await
    }

    async fn update(
        &self,
        request: Request<wire::UpdateRequest>,
    ) -> Result<Response<wire::WriteReply>, Status> {
        let key = request.get_ref().member_id.clone();
        self.serve("update", &request, Some(&key), |_| async {
            let r = request.get_ref();
            let id = model::parse_member_id(&r.member_id)?;
            let name = r.name.as_deref().map(model::parse_name).transpose()?;
            let level = r.level.as_deref().map(model::parse_level).transpose()?;
            if name.is_none() && level.is_none() {
                return Err(Invalid::EmptyUpdate.into());
            }
            self.members
                .write(id, Change::Update { name, level })
                .await
                .map(reply)
        })
        .await
    }

    async fn bind(&self, request: Request<wire::BindRequest>) -> Result<Response<wire::WriteReply>, Status> {
        self.change_binding("bind", request, Change::Bind).await
    }

    async fn unbind(
        &self,
        request: Request<wire::BindRequest>,
    ) -> Result<Response<wire::WriteReply>, Status> {
        self.change_binding("unbind", request, Change::Unbind).await
    }

    async fn get(&self, request: Request<wire::GetRequest>) -> Result<Response<wire::Member>, Status> {
        let key = request.get_ref().member_id.clone();
        self.serve("get", &request, Some(&key), |_| async {
            let r = request.get_ref();
            let id = model::parse_member_id(&r.member_id)?;
            match self.members.get(id, read_after(&r.read_after)).await? {
                Some(member) => Ok(to_wire(&member)),
                None => Err(Conflict::NoMember(id).into()),
            }
        })
        .await
    }

    async fn lookup(
        &self,
        request: Request<wire::LookupRequest>,
    ) -> Result<Response<wire::LookupReply>, Status> {
        let key = request
            .get_ref()
            .identity
            .as_ref()
            .map(|i| i.value.clone())
            .unwrap_or_default();
        let r = request.get_ref();
        self.serve("lookup", &request, Some(&key), |caller| async move {
            let identity = identity(r.identity.as_ref())?;
            let found = self.members.lookup(&[identity], caller.class).await?;
            Ok(wire::LookupReply {
                member: found.into_iter().next().flatten().as_ref().map(to_wire),
            })
        })
        .await
    }

    async fn lookup_many(
        &self,
        request: Request<wire::LookupManyRequest>,
    ) -> Result<Response<wire::LookupManyReply>, Status> {
        let r = request.get_ref();
        self.serve("lookup_many", &request, None, |caller| async move {
            let asked = identities(&r.identities, MAX_LOOKUPS, "identities")?;
            let found = self.members.lookup(&asked, caller.class).await?;
            Ok(wire::LookupManyReply {
                found: found
                    .iter()
                    .map(|m| wire::LookupReply {
                        member: m.as_ref().map(to_wire),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn bindings(
        &self,
        request: Request<wire::GetRequest>,
    ) -> Result<Response<wire::BindingsReply>, Status> {
        let key = request.get_ref().member_id.clone();
        self.serve("bindings", &request, Some(&key), |_| async {
            let r = request.get_ref();
            let id = model::parse_member_id(&r.member_id)?;
            match self.members.get(id, read_after(&r.read_after)).await? {
                Some(member) => Ok(wire::BindingsReply {
                    identities: member.identities.iter().map(to_wire_identity).collect(),
                }),
                None => Err(Conflict::NoMember(id).into()),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_answers_with_the_code_a_caller_can_act_on() {
        let phone = Identity::parse(IdentityKind::Phone, "13812345678").unwrap_or_else(|e| panic!("{e}"));
        #[rustfmt::skip]
        let table: Vec<(Failure, Code, &str)> = vec![
            (Invalid::Phone("1".into()).into(), Code::InvalidArgument, "not a mainland mobile"),
            (CallerError::Missing(caller::ACCOUNT).into(), Code::Unauthenticated, "x-ballast-caller"),
            (CallerError::Unknown("x".into()).into(), Code::PermissionDenied, "not registered"),
            (CallerError::Class("vip".into()).into(), Code::InvalidArgument, "vip"),
            (Conflict::NoMember(4).into(), Code::NotFound, "member 4"),
            (Conflict::BoundElsewhere { identity: phone, owner: 9 }.into(), Code::AlreadyExists, "bound to member 9"),
            (Conflict::Full(4).into(), Code::FailedPrecondition, "16 identities"),
            (Failure::Unavailable { dependency: "redis dc-b".into(), detail: "refused".into() }, Code::Unavailable, "redis dc-b"),
            (Failure::Contended(4), Code::Aborted, "retry"),
            (Failure::Fenced { written: 1, now: 2 }, Code::Unavailable, "epoch 1, now 2"),
        ];
        for (failure, code, says) in table {
            let s = status(failure);
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(s.message().contains(says), "{} lacks {says}", s.message());
        }
    }

    #[test]
    fn wire_identities_are_checked_by_kind_and_count() {
        let wire = |kind: wire::IdentityKind, value: &str| wire::Identity {
            kind: kind.into(),
            value: value.into(),
        };
        assert!(identity(Some(&wire(wire::IdentityKind::Phone, "13812345678"))).is_ok());
        assert_eq!(identity(None), Err(Invalid::NoIdentity));
        assert_eq!(
            identity(Some(&wire(wire::IdentityKind::Unspecified, "1"))),
            Err(Invalid::Kind(0))
        );
        let unknown = wire::Identity {
            kind: 99,
            value: "1".into(),
        };
        assert_eq!(identity(Some(&unknown)), Err(Invalid::Kind(99)));
        let many = vec![wire(wire::IdentityKind::ElongCard, "123456"); MAX_LOOKUPS + 1];
        assert_eq!(
            identities(&many, MAX_LOOKUPS, "identities").map_err(|e| e.reason()),
            Err("too_many")
        );
    }

    #[test]
    fn a_member_goes_on_the_wire_with_its_identities_in_order() {
        let member = Member {
            id: 12,
            name: "n".into(),
            level: "gold".into(),
            identities: [
                Identity::parse(IdentityKind::ElongCard, "123456"),
                Identity::parse(IdentityKind::Phone, "13812345678"),
            ]
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap_or_default(),
            version: 3,
            updated_ms: 5,
        };
        let w = to_wire(&member);
        assert_eq!(w.member_id, "12");
        assert_eq!(w.identities[0].kind, i32::from(wire::IdentityKind::Phone));
        assert_eq!(w.identities[1].value, "123456");
    }
}
