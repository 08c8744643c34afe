//! A credential in memory: it prints as `[redacted]` wherever it goes
//! (`{:?}` of a config, a log field, a panic message), and is read only
//! through [`Secret::expose`], at the edge where a client is handed it.

use std::fmt;
use std::str::FromStr;

/// A password or token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// The credential itself, for the client that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// From a command-line argument or environment variable.
impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_prints_redacted_however_it_is_printed() {
        let secret = Secret::from("p@ss/w:rd");
        let config = Some((String::from("user"), secret.clone()));
        for shown in [
            format!("{secret}"),
            format!("{secret:?}"),
            format!("{config:?}"),
            format!("{secret:#?}"),
        ] {
            assert!(!shown.contains("p@ss"), "{shown}");
            assert!(shown.contains("[redacted]"), "{shown}");
        }
        assert_eq!(secret.expose(), "p@ss/w:rd");
    }
}
