//! The data plane's authentication: every gRPC call between a pipeline's
//! roles (deliveries, ingests, tasks, hand-offs) carries the pipeline's token,
//! and every server refuses a call without it with UNAUTHENTICATED, counted.
//! The operator keeps the token in the pipeline's Secret
//! `<pipeline>-data-plane`; pods get it as `BALLAST_DATA_PLANE_TOKEN`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::secret::Secret;

/// Metadata key the token travels in.
const AUTHORIZATION: &str = "authorization";

/// A pipeline's data-plane token. As a client interceptor it adds itself to
/// every call; it never prints.
#[derive(Clone)]
pub struct Token {
    header: MetadataValue<Ascii>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token([redacted])")
    }
}

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Too short to be a secret, or not printable ASCII (a header value).
    #[error("the data-plane token must be 16 to 512 printable ASCII characters")]
    Malformed,
}

impl Token {
    /// The token `secret` holds (the Secret's value, as the pod's environment has it).
    pub fn new(secret: &Secret) -> Result<Self, TokenError> {
        let token = secret.expose();
        let printable = token.bytes().all(|b| b.is_ascii_graphic());
        if !(16..=512).contains(&token.len()) || !printable {
            return Err(TokenError::Malformed);
        }
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| TokenError::Malformed)?;
        Ok(Self { header })
    }

    /// Whether `metadata` carries this token, compared in constant time (a
    /// prober learns nothing from how long a refusal takes). Pure.
    pub fn admits(&self, metadata: &MetadataMap) -> bool {
        metadata
            .get(AUTHORIZATION)
            .is_some_and(|given| constant_time_eq(given.as_bytes(), self.header.as_bytes()))
    }
}

/// A token from its text (a tool's or a test's; pods read theirs from the environment).
impl std::str::FromStr for Token {
    type Err = TokenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::new(&Secret::from(text))
    }
}

/// Byte strings equal, in time that depends on their length only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Every call of a client built on it carries the token.
impl Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(AUTHORIZATION, self.header.clone());
        Ok(request)
    }
}

/// A channel whose calls carry the token.
pub type Authed = InterceptedService<Channel, Token>;

/// A [`crate::grpc::channel`] to `address` whose calls carry `token`.
pub fn channel(
    address: &str,
    deadline: std::time::Duration,
    token: &Token,
) -> Result<Authed, tonic::transport::Error> {
    Ok(InterceptedService::new(
        crate::grpc::channel(address, deadline)?,
        token.clone(),
    ))
}

/// A server's check: a call without the pipeline's token is refused before
/// its handler runs, and counted (`ballast_data_plane_unauthenticated_calls_total`).
#[derive(Clone, Debug)]
pub struct Guard {
    token: Token,
    refused: Counter,
}

impl Guard {
    /// A guard admitting `token`, its counter registered in `registry`.
    pub fn register(token: Token, registry: &mut Registry) -> Self {
        let refused = Counter::default();
        registry.sub_registry_with_prefix("data_plane").register(
            "unauthenticated_calls",
            "gRPC calls refused for not carrying the pipeline's data-plane token",
            refused.clone(),
        );
        Self { token, refused }
    }
}

impl Interceptor for Guard {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.token.admits(request.metadata()) {
            return Ok(request);
        }
        self.refused.inc();
        Err(Status::unauthenticated(
            "the call does not carry this pipeline's data-plane token (Secret <pipeline>-data-plane)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_printable_ascii_of_a_secrets_length() {
        // (token, usable)
        let cases = [
            ("0123456789abcdef", true),
            ("short", false),
            ("0123456789abcdef with space", false),
            ("0123456789abcdef\n", false),
            ("0123456789abcdéf", false),
        ];
        for (token, usable) in cases {
            assert_eq!(Token::new(&Secret::from(token)).is_ok(), usable, "{token:?}");
        }
        assert!(Token::new(&Secret::from("x".repeat(513))).is_err());
    }

    #[test]
    fn only_the_same_token_is_admitted() -> Result<(), TokenError> {
        let token = Token::new(&Secret::from("0123456789abcdef0123"))?;
        let mut carried = Request::new(());
        let mut client = token.clone();
        carried = client.call(carried).expect("adds the token");
        assert!(token.admits(carried.metadata()));
        // (header value, admitted)
        let cases = [
            ("Bearer 0123456789abcdef0124", false),
            ("Bearer 0123456789abcdef012", false),
            ("0123456789abcdef0123", false),
            ("Basic 0123456789abcdef0123", false),
        ];
        for (header, admitted) in cases {
            let mut metadata = MetadataMap::new();
            metadata.insert(AUTHORIZATION, header.parse().expect("ascii"));
            assert_eq!(token.admits(&metadata), admitted, "{header}");
        }
        assert!(!token.admits(&MetadataMap::new()), "no header");
        assert!(!format!("{token:?}").contains("0123"));
        Ok(())
    }
}
