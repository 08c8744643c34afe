//! What a request may ask: each bad input gets a 400 naming the problem, and
//! a reason label for the metric. Pure.

/// Why a request was refused as bad input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadInput {
    /// The merchant id is empty.
    #[error("the merchant id is empty")]
    EmptyMerchant,
    /// The merchant id is longer than the stores hold.
    #[error("the merchant id is {0} bytes long; at most {MAX_MERCHANT_BYTES} are allowed")]
    LongMerchant(usize),
    /// The merchant id holds a character outside the allowed set.
    #[error("the merchant id holds {0:?}; only letters, digits and - _ . : @ are allowed")]
    MerchantCharacter(char),
    /// The path could not be read (not UTF-8, or missing parts).
    #[error("the request path is malformed: {0}")]
    Path(String),
}

impl BadInput {
    /// Machine-readable reason, as the 400 body and the metric label name it.
    pub fn code(&self) -> &'static str {
        match self {
            BadInput::EmptyMerchant => "emptyMerchant",
            BadInput::LongMerchant(_) => "longMerchant",
            BadInput::MerchantCharacter(_) => "merchantCharacter",
            BadInput::Path(_) => "malformedPath",
        }
    }
}

/// Bytes of a merchant id at most: the hot MySQL's key column holds 191.
pub const MAX_MERCHANT_BYTES: usize = 191;

/// A merchant id as the stores key it: 1 to 191 bytes of letters, digits and
/// `-_.:@` (nothing that could reach a key, a statement or a query as syntax).
pub fn merchant(id: &str) -> Result<&str, BadInput> {
    if id.is_empty() {
        return Err(BadInput::EmptyMerchant);
    }
    if id.len() > MAX_MERCHANT_BYTES {
        return Err(BadInput::LongMerchant(id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')))
    {
        return Err(BadInput::MerchantCharacter(c));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merchant_ids_are_checked_before_any_store_sees_them() {
        let long = "m".repeat(192);
        let longest = "m".repeat(191);
        let cases: Vec<(&str, Result<(), BadInput>)> = vec![
            ("shop-m1", Ok(())),
            ("a.b_c:d@e-9", Ok(())),
            (&longest, Ok(())),
            ("", Err(BadInput::EmptyMerchant)),
            (&long, Err(BadInput::LongMerchant(192))),
            ("m1' OR '1'='1", Err(BadInput::MerchantCharacter('\''))),
            ("m1\"}}", Err(BadInput::MerchantCharacter('"'))),
            ("m 1", Err(BadInput::MerchantCharacter(' '))),
            ("m*", Err(BadInput::MerchantCharacter('*'))),
            ("mé", Err(BadInput::MerchantCharacter('é'))),
            ("m\n1", Err(BadInput::MerchantCharacter('\n'))),
        ];
        for (id, want) in cases {
            assert_eq!(merchant(id).map(|_| ()), want, "{id:?}");
        }
    }
}
