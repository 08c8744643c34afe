//! The pipeline's data plane, closed to everyone else: the token its roles
//! carry on every gRPC call (a Secret the operator creates once, or one a
//! team provides under the same name), and the NetworkPolicy that admits
//! only the pipeline's own pods to their gRPC ports. Pure, but for the
//! randomness of a new token.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The key of the token in the Secret.
pub const TOKEN_KEY: &str = "token";

/// The env var pods read the token from.
pub const TOKEN_ENV: &str = "BALLAST_DATA_PLANE_TOKEN";

/// The roles that call each other over gRPC, and so carry the token.
pub const TOKEN_ROLES: [&str; 4] = ["collector", "intake", "master", "slave"];

/// The name of a pipeline's data-plane Secret.
pub fn secret_name(pipeline: &str) -> String {
    format!("{pipeline}-data-plane")
}

/// A new token: 32 random bytes, hex (as a header value takes it).
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The Secret holding `token`, owned by the pipeline (deleted with it).
pub fn secret(pipeline: &str, namespace: &str, owner: &OwnerReference, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(pipeline)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels(pipeline)),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_owned(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

fn labels(pipeline: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), pipeline.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "ballast-operator".to_owned(),
        ),
    ])
}

/// The pipeline's pods: what the policy protects and whom it admits.
fn pods(pipeline: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(pipeline)),
        ..LabelSelector::default()
    }
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

/// Ingress to the pipeline's pods: every port from the pipeline's own pods;
/// from anywhere else only `open_port` (metrics, probes and the query API).
/// The gRPC ports (backup intake, slave) are thereby the pipeline's alone,
/// beside the token every call must carry.
pub fn network_policy(metadata: ObjectMeta, pipeline: &str, open_port: i32) -> NetworkPolicy {
    NetworkPolicy {
        metadata,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pods(pipeline)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(pods(pipeline)),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: None,
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![tcp(open_port)]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_is_64_hex_digits_and_never_the_same() -> Result<(), getrandom::Error> {
        let (a, b) = (new_token()?, new_token()?);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        Ok(())
    }

    #[test]
    fn the_policy_opens_only_the_open_port_to_other_pods() {
        let policy = network_policy(ObjectMeta::default(), "shop", 9090);
        let spec = policy.spec.expect("spec");
        let selected = spec.pod_selector.and_then(|s| s.match_labels).expect("labels");
        assert_eq!(
            selected.get("app.kubernetes.io/instance").map(String::as_str),
            Some("shop")
        );
        let rules = spec.ingress.expect("ingress");
        // (peers, ports): the pipeline's pods on every port; anyone on 9090 only.
        let own = rules.iter().find(|r| r.from.is_some()).expect("own pods");
        assert!(own.ports.is_none());
        let open = rules.iter().find(|r| r.from.is_none()).expect("anyone");
        let ports: Vec<_> = open
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.port.clone())
            .collect();
        assert_eq!(ports, vec![IntOrString::Int(9090)]);
    }
}
