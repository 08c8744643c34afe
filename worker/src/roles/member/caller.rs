//! Who is calling: the caller account and class every request carries in
//! its metadata, and whether the MemberStore knows the account. Pure.

use std::collections::HashSet;

use ballast_crds::member_store::FlowControl;

/// Metadata key of the caller account.
pub const ACCOUNT: &str = "x-ballast-caller";
/// Metadata key of the caller class.
pub const CLASS: &str = "x-ballast-caller-class";

/// The kind of traffic a caller sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Part of placing an order: served first, from the primary cluster.
    OrderFlow,
    /// Campaigns and other high-volume reads: served from the marketing
    /// cluster, never the primary.
    Marketing,
}

impl Class {
    /// As metadata and metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrderFlow => "order-flow",
            Self::Marketing => "marketing",
        }
    }
}

/// A request's caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller account.
    pub account: String,
    /// Its class.
    pub class: Class,
}

/// Why a request's caller was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallerError {
    /// A metadata entry is missing (UNAUTHENTICATED).
    #[error("the request carries no `{0}` metadata")]
    Missing(&'static str),
    /// The account is not a valid name (INVALID_ARGUMENT).
    #[error("caller account must be 1 to 128 letters, digits, `-`, `_` or `.`")]
    Malformed,
    /// The class is neither `order-flow` nor `marketing` (INVALID_ARGUMENT).
    #[error("caller class `{0}` is neither order-flow nor marketing")]
    Class(String),
    /// The MemberStore does not know the account (PERMISSION_DENIED).
    #[error("caller account {0} is not registered with this member store")]
    Unknown(String),
}

impl CallerError {
    /// Short name, as the refusal metric labels it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing(_) => "caller_missing",
            Self::Malformed => "caller_malformed",
            Self::Class(_) => "caller_class",
            Self::Unknown(_) => "caller_unknown",
        }
    }
}

/// The caller of a request with metadata entries `account` and `class`.
pub fn identify(account: Option<&str>, class: Option<&str>) -> Result<Caller, CallerError> {
    let account = account.ok_or(CallerError::Missing(ACCOUNT))?;
    let class = class.ok_or(CallerError::Missing(CLASS))?;
    let valid = (1..=128).contains(&account.len())
        && account
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return Err(CallerError::Malformed);
    }
    let class = match class {
        "order-flow" => Class::OrderFlow,
        "marketing" => Class::Marketing,
        other => return Err(CallerError::Class(other.chars().take(40).collect())),
    };
    Ok(Caller {
        account: account.to_owned(),
        class,
    })
}

/// The accounts a MemberStore admits: those it lists; every other one too
/// when it sets a rate for unlisted callers or lists none at all (then only
/// the global rate holds them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Known {
    listed: HashSet<String>,
    open: bool,
}

impl Known {
    /// The accounts `flow` admits.
    pub fn of(flow: &FlowControl) -> Self {
        Self {
            listed: flow.callers.iter().map(|c| c.caller.clone()).collect(),
            open: flow.callers.is_empty() || flow.unlisted_caller_rate_per_second.is_some(),
        }
    }

    /// Whether `account` may call.
    pub fn admits(&self, account: &str) -> Result<(), CallerError> {
        if self.open || self.listed.contains(account) {
            Ok(())
        } else {
            Err(CallerError::Unknown(account.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_crds::member_store::CallerLimit;

    #[test]
    fn the_caller_comes_from_its_two_metadata_entries() {
        #[rustfmt::skip]
        let table = [
            (Some("orders"), Some("order-flow"), Ok(("orders", Class::OrderFlow))),
            (Some("camp.2026_a-b"), Some("marketing"), Ok(("camp.2026_a-b", Class::Marketing))),
            (None, Some("marketing"), Err("caller_missing")),
            (Some("orders"), None, Err("caller_missing")),
            (Some(""), Some("marketing"), Err("caller_malformed")),
            (Some("a b"), Some("marketing"), Err("caller_malformed")),
            (Some("orders"), Some("Marketing"), Err("caller_class")),
        ];
        for (account, class, expected) in table {
            let got = identify(account, class);
            match expected {
                Ok((a, c)) => assert_eq!(
                    got,
                    Ok(Caller {
                        account: a.into(),
                        class: c
                    })
                ),
                Err(reason) => assert_eq!(got.map_err(|e| e.reason()), Err(reason), "{account:?} {class:?}"),
            }
        }
        let long = "a".repeat(129);
        assert_eq!(
            identify(Some(&long), Some("marketing")),
            Err(CallerError::Malformed)
        );
    }

    #[test]
    fn unlisted_accounts_are_refused_only_when_the_store_lists_callers_and_no_unlisted_rate() {
        let listed = |unlisted: Option<i32>| FlowControl {
            callers: vec![CallerLimit {
                caller: "orders".into(),
                rate_per_second: 10,
                shadow: false,
            }],
            unlisted_caller_rate_per_second: unlisted,
            ..FlowControl::default()
        };
        #[rustfmt::skip]
        let table = [
            (FlowControl::default(), "anyone", true),
            (listed(None), "orders", true),
            (listed(None), "stranger", false),
            (listed(Some(5)), "stranger", true),
        ];
        for (flow, account, admitted) in table {
            assert_eq!(
                Known::of(&flow).admits(account).is_ok(),
                admitted,
                "{account} {flow:?}"
            );
        }
    }
}
