//! Members and their identities as values: what a valid identity, name and
//! level are, and every change to a member as a pure function of the member
//! before it.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Identities a member may have at most: a member with more is a sign of a
/// caller binding in a loop, not of a person.
pub const MAX_IDENTITIES: usize = 16;

/// What an identity is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IdentityKind {
    /// A mainland mobile number.
    #[serde(rename = "phone")]
    Phone,
    /// A WeChat unionid.
    #[serde(rename = "unionid")]
    WechatUnionid,
    /// A Tongcheng membership card number.
    #[serde(rename = "tcCard")]
    TongchengCard,
    /// An eLong membership card number.
    #[serde(rename = "elCard")]
    ElongCard,
}

impl IdentityKind {
    /// Every kind.
    pub const ALL: [Self; 4] = [
        Self::Phone,
        Self::WechatUnionid,
        Self::TongchengCard,
        Self::ElongCard,
    ];

    /// The name used in cache keys, search fields and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Phone => "phone",
            Self::WechatUnionid => "unionid",
            Self::TongchengCard => "tcCard",
            Self::ElongCard => "elCard",
        }
    }

    /// The number stored in MySQL (stable: never renumber).
    pub fn code(self) -> u8 {
        match self {
            Self::Phone => 1,
            Self::WechatUnionid => 2,
            Self::TongchengCard => 3,
            Self::ElongCard => 4,
        }
    }

    /// The kind stored as `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// A validated, normalised identity: two spellings of one phone number are
/// one identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// What it is.
    pub kind: IdentityKind,
    /// Its normalised value.
    pub value: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.value)
    }
}

/// Why a request's input was refused (INVALID_ARGUMENT), naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not a mainland mobile number.
    #[error("phone `{0}` is not a mainland mobile number (11 digits starting with 1)")]
    Phone(String),
    /// Not a WeChat unionid.
    #[error("unionid `{0}` is not a WeChat unionid (28 letters, digits, `-` or `_`)")]
    Unionid(String),
    /// Not a card number.
    #[error("{kind} `{value}` is not a card number (6 to 20 digits)")]
    Card {
        /// Which card.
        kind: &'static str,
        /// The value given.
        value: String,
    },
    /// No kind, or one this service does not know.
    #[error("identity kind {0} is not one of phone, unionid, tcCard, elCard")]
    Kind(i32),
    /// The identity is missing.
    #[error("the request has no identity")]
    NoIdentity,
    /// Not a member id.
    #[error("member id `{0}` is not a member id (a positive decimal number)")]
    MemberId(String),
    /// Not a name.
    #[error("name must be 1 to 64 characters without control characters")]
    Name,
    /// Not a level.
    #[error("level `{0}` must be 1 to 32 letters, digits, `-` or `_`")]
    Level(String),
    /// More items than one call may carry.
    #[error("{what}: {given} given, at most {max} per call")]
    TooMany {
        /// What there were too many of.
        what: &'static str,
        /// How many were given.
        given: usize,
        /// The most allowed.
        max: usize,
    },
    /// An update that changes nothing.
    #[error("an update needs a name or a level")]
    EmptyUpdate,
    /// A `read_after` that no write gave.
    #[error("read_after `{0}` is not a token a write's reply gave")]
    ReadAfter(String),
}

impl Invalid {
    /// Short name of the problem, as the refusal metric labels it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Phone(_) => "phone",
            Self::Unionid(_) => "unionid",
            Self::Card { .. } => "card",
            Self::Kind(_) => "kind",
            Self::NoIdentity => "no_identity",
            Self::MemberId(_) => "member_id",
            Self::Name => "name",
            Self::Level(_) => "level",
            Self::TooMany { .. } => "too_many",
            Self::EmptyUpdate => "empty_update",
            Self::ReadAfter(_) => "read_after",
        }
    }
}

/// At most this many characters of a refused value are quoted back.
const QUOTED: usize = 40;

fn quoted(value: &str) -> String {
    value.chars().take(QUOTED).collect()
}

impl Identity {
    /// `value` as an identity of `kind`, normalised, or why not.
    pub fn parse(kind: IdentityKind, value: &str) -> Result<Self, Invalid> {
        let value = value.trim();
        let normalised = match kind {
            IdentityKind::Phone => {
                let digits = value
                    .strip_prefix("+86")
                    .or_else(|| value.strip_prefix("0086"))
                    .unwrap_or(value);
                let digits: String = digits.chars().filter(|c| *c != ' ' && *c != '-').collect();
                let bytes = digits.as_bytes();
                let valid = bytes.len() == 11
                    && bytes[0] == b'1'
                    && (b'3'..=b'9').contains(&bytes[1])
                    && bytes.iter().all(u8::is_ascii_digit);
                if !valid {
                    return Err(Invalid::Phone(quoted(value)));
                }
                digits
            }
            IdentityKind::WechatUnionid => {
                let valid = value.len() == 28
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !valid {
                    return Err(Invalid::Unionid(quoted(value)));
                }
                value.to_owned()
            }
            IdentityKind::TongchengCard | IdentityKind::ElongCard => {
                let valid = (6..=20).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit());
                if !valid {
                    return Err(Invalid::Card {
                        kind: kind.as_str(),
                        value: quoted(value),
                    });
                }
                value.to_owned()
            }
        };
        Ok(Self {
            kind,
            value: normalised,
        })
    }
}

/// A member id: positive, decimal on the wire.
pub fn parse_member_id(text: &str) -> Result<u64, Invalid> {
    match text.parse::<u64>() {
        Ok(id) if id > 0 && !text.starts_with('+') => Ok(id),
        _ => Err(Invalid::MemberId(quoted(text))),
    }
}

/// A member's name: 1 to 64 characters, none of them control characters.
pub fn parse_name(text: &str) -> Result<String, Invalid> {
    let count = text.chars().count();
    if (1..=64).contains(&count) && !text.chars().any(char::is_control) && !text.trim().is_empty() {
        Ok(text.to_owned())
    } else {
        Err(Invalid::Name)
    }
}

/// A member's level: a keyword of 1 to 32 letters, digits, `-` or `_`.
pub fn parse_level(text: &str) -> Result<String, Invalid> {
    let valid = (1..=32).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(text.to_owned())
    } else {
        Err(Invalid::Level(quoted(text)))
    }
}

/// A member as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Its id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Its level.
    pub level: String,
    /// The identities bound to it.
    pub identities: BTreeSet<Identity>,
    /// Increases with every change: stores keep the newest they are given.
    pub version: u64,
    /// When it last changed, in milliseconds since the Unix epoch.
    pub updated_ms: i64,
}

/// A change a caller asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new member.
    Register {
        /// Its name.
        name: String,
        /// Its level.
        level: String,
        /// Its first identities.
        identities: BTreeSet<Identity>,
    },
    /// New name or level.
    Update {
        /// The new name, if it changes.
        name: Option<String>,
        /// The new level, if it changes.
        level: Option<String>,
    },
    /// One more identity.
    Bind(Identity),
    /// One identity less.
    Unbind(Identity),
}

impl Change {
    /// The method name, as metrics and logs label it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Register { .. } => "register",
            Self::Update { .. } => "update",
            Self::Bind(_) => "bind",
            Self::Unbind(_) => "unbind",
        }
    }
}

/// Why a change cannot be made to the member as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// No member has this id.
    #[error("member {0} does not exist")]
    NoMember(u64),
    /// The identity is bound to another member.
    #[error("{identity} is already bound to member {owner}")]
    BoundElsewhere {
        /// The identity.
        identity: Identity,
        /// The member it is bound to.
        owner: u64,
    },
    /// The member has as many identities as allowed.
    #[error("member {0} already has {MAX_IDENTITIES} identities, the most allowed")]
    Full(u64),
    /// A registration under an id already taken (ids are random: try another).
    #[error("member id {0} is taken")]
    IdTaken(u64),
}

/// What a change does to a member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effect {
    /// The member before, if it existed.
    pub before: Option<Member>,
    /// The member after.
    pub after: Member,
    /// Identities it now claims that it did not.
    pub claimed: Vec<Identity>,
    /// Identities it no longer claims.
    pub released: Vec<Identity>,
}

impl Effect {
    /// Whether anything changed (a repeated bind or unbind changes nothing).
    pub fn changed(&self) -> bool {
        self.before.as_ref() != Some(&self.after)
    }

    /// Every identity the member had before or has after: the cache keys the
    /// change makes stale.
    pub fn touched(&self) -> BTreeSet<&Identity> {
        let before = self.before.iter().flat_map(|m| m.identities.iter());
        before.chain(self.after.identities.iter()).collect()
    }
}

/// `change` applied to member `id` as it is (`current`), at `now_ms`. Pure:
/// who else holds an identity is the store's to check (it claims `claimed`).
pub fn apply(current: Option<&Member>, id: u64, change: &Change, now_ms: i64) -> Result<Effect, Conflict> {
    let Some(before) = current else {
        return match change {
            Change::Register {
                name,
                level,
                identities,
            } => register(id, name, level, identities, now_ms),
            _ => Err(Conflict::NoMember(id)),
        };
    };
    let mut after = before.clone();
    let mut claimed = Vec::new();
    let mut released = Vec::new();
    match change {
        Change::Register { .. } => return Err(Conflict::IdTaken(id)),
        Change::Update { name, level } => {
            if let Some(name) = name {
                after.name.clone_from(name);
            }
            if let Some(level) = level {
                after.level.clone_from(level);
            }
        }
        Change::Bind(identity) => {
            if !after.identities.contains(identity) {
                if after.identities.len() >= MAX_IDENTITIES {
                    return Err(Conflict::Full(id));
                }
                after.identities.insert(identity.clone());
                claimed.push(identity.clone());
            }
        }
        Change::Unbind(identity) => {
            if after.identities.remove(identity) {
                released.push(identity.clone());
            }
        }
    }
    if after != *before {
        after.version = before.version + 1;
        after.updated_ms = now_ms.max(before.updated_ms);
    }
    Ok(Effect {
        before: Some(before.clone()),
        after,
        claimed,
        released,
    })
}

fn register(
    id: u64,
    name: &str,
    level: &str,
    identities: &BTreeSet<Identity>,
    now_ms: i64,
) -> Result<Effect, Conflict> {
    if identities.len() > MAX_IDENTITIES {
        return Err(Conflict::Full(id));
    }
    Ok(Effect {
        before: None,
        claimed: identities.iter().cloned().collect(),
        released: Vec::new(),
        after: Member {
            id,
            name: name.to_owned(),
            level: level.to_owned(),
            identities: identities.clone(),
            version: 1,
            updated_ms: now_ms,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(kind: IdentityKind, value: &str) -> Identity {
        Identity::parse(kind, value).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn identities_are_validated_and_normalised_by_kind() {
        use IdentityKind::*;
        let union = "oAbCdEfGhIjKlMnOpQrStUvWx-_1";
        #[rustfmt::skip]
        let table: [(IdentityKind, &str, Result<&str, &str>); 16] = [
            (Phone, "13812345678", Ok("13812345678")),
            (Phone, "+86 138-1234-5678", Ok("13812345678")),
            (Phone, "008613812345678", Ok("13812345678")),
            (Phone, "12812345678", Err("phone")),
            (Phone, "1381234567", Err("phone")),
            (Phone, "1381234567a", Err("phone")),
            (Phone, "", Err("phone")),
            (WechatUnionid, union, Ok(union)),
            (WechatUnionid, "oAbCdEfGhIjKlMnOpQrStUvWx-_", Err("unionid")),
            (WechatUnionid, "oAbCdEfGhIjKlMnOpQrStUvWx-_1 ", Ok(union)),
            (WechatUnionid, "oAbCdEfGhIjKlMnOpQrStUvWx'_1", Err("unionid")),
            (TongchengCard, "123456", Ok("123456")),
            (TongchengCard, "12345", Err("card")),
            (ElongCard, "123456789012345678901", Err("card")),
            (ElongCard, "12345678901234567890", Ok("12345678901234567890")),
            (ElongCard, "١٢٣٤٥٦", Err("card")),
        ];
        for (kind, value, expected) in table {
            let got = Identity::parse(kind, value);
            match expected {
                Ok(normal) => assert_eq!(got.map(|i| i.value), Ok(normal.to_owned()), "{kind:?} {value:?}"),
                Err(reason) => assert_eq!(got.map_err(|e| e.reason()), Err(reason), "{kind:?} {value:?}"),
            }
        }
    }

    #[test]
    fn a_refusal_quotes_at_most_forty_characters_of_what_it_refused() {
        let long = "9".repeat(10_000);
        let message = Identity::parse(IdentityKind::Phone, &long)
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(message.len() < 120, "{message}");
    }

    #[test]
    fn member_ids_names_and_levels_are_checked() {
        assert_eq!(parse_member_id("42"), Ok(42));
        for bad in ["0", "-1", "+1", "x", "", "18446744073709551616"] {
            assert!(parse_member_id(bad).is_err(), "{bad:?}");
        }
        assert!(parse_name("张三").is_ok());
        for bad in ["", "  ", "a\nb", &"n".repeat(65)] {
            assert_eq!(parse_name(bad), Err(Invalid::Name), "{bad:?}");
        }
        assert!(parse_level("gold-2").is_ok());
        for bad in ["", "gold plus", &"l".repeat(33)] {
            assert!(parse_level(bad).is_err(), "{bad:?}");
        }
    }

    fn member() -> Member {
        Member {
            id: 7,
            name: "A".into(),
            level: "gold".into(),
            identities: [id(IdentityKind::Phone, "13812345678")].into(),
            version: 3,
            updated_ms: 1_000,
        }
    }

    #[test]
    fn each_change_yields_the_next_version_and_what_it_claims_or_releases() {
        let phone = id(IdentityKind::Phone, "13812345678");
        let card = id(IdentityKind::ElongCard, "123456");
        let m = member();
        #[rustfmt::skip]
        type Expected = Result<(u64, usize, Vec<Identity>, Vec<Identity>), Conflict>;
        let table: Vec<(Option<&Member>, Change, Expected)> = vec![
            (
                None,
                Change::Register {
                    name: "B".into(),
                    level: "l".into(),
                    identities: [card.clone()].into(),
                },
                Ok((1, 1, vec![card.clone()], vec![])),
            ),
            (
                Some(&m),
                Change::Register {
                    name: "B".into(),
                    level: "l".into(),
                    identities: BTreeSet::new(),
                },
                Err(Conflict::IdTaken(7)),
            ),
            (None, Change::Bind(card.clone()), Err(Conflict::NoMember(7))),
            (
                Some(&m),
                Change::Bind(card.clone()),
                Ok((4, 2, vec![card.clone()], vec![])),
            ),
            (Some(&m), Change::Bind(phone.clone()), Ok((3, 1, vec![], vec![]))),
            (
                Some(&m),
                Change::Unbind(phone.clone()),
                Ok((4, 0, vec![], vec![phone.clone()])),
            ),
            (Some(&m), Change::Unbind(card.clone()), Ok((3, 1, vec![], vec![]))),
            (
                Some(&m),
                Change::Update {
                    name: Some("C".into()),
                    level: None,
                },
                Ok((4, 1, vec![], vec![])),
            ),
            (
                Some(&m),
                Change::Update {
                    name: Some("A".into()),
                    level: Some("gold".into()),
                },
                Ok((3, 1, vec![], vec![])),
            ),
        ];
        for (current, change, expected) in table {
            let got = apply(current, 7, &change, 2_000)
                .map(|e| (e.after.version, e.after.identities.len(), e.claimed, e.released));
            assert_eq!(got, expected, "{change:?}");
        }
    }

    #[test]
    fn a_member_cannot_hold_more_than_sixteen_identities() {
        let mut m = member();
        m.identities = (0..MAX_IDENTITIES)
            .map(|n| id(IdentityKind::TongchengCard, &format!("{:06}", n)))
            .collect();
        let more = id(IdentityKind::ElongCard, "999999");
        assert_eq!(apply(Some(&m), 7, &Change::Bind(more), 1), Err(Conflict::Full(7)));
    }

    #[test]
    fn a_change_touches_every_identity_before_and_after() {
        let m = member();
        let card = id(IdentityKind::ElongCard, "123456");
        let effect = apply(Some(&m), 7, &Change::Bind(card.clone()), 5).unwrap_or_else(|e| panic!("{e}"));
        assert!(effect.changed());
        assert_eq!(effect.touched().len(), 2);
        let effect = apply(Some(&m), 7, &Change::Unbind(card), 5).unwrap_or_else(|e| panic!("{e}"));
        assert!(!effect.changed());
        assert_eq!(effect.after.updated_ms, 1_000, "no change keeps the time");
    }
}
