//! What the operator's scenario tests share.

use ballast_e2e::scenario;

/// Polls `check` until it yields a value or `secs` pass: `scenario::eventually`
/// for checks that fail with any error (`anyhow`).
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    Ok(scenario::eventually(what, secs, check).await?)
}

/// Whether RBAC lets `user` `verb` `resource` (of API `group`, `""` for the
/// core API) in `namespace`, named `name` if given: the API server's own
/// SubjectAccessReview, so a test can tell RBAC's answer from admission's.
#[allow(dead_code)] // Compiled into every test binary; only some review access.
pub async fn rbac_allows(
    client: &kube::Client,
    user: &str,
    namespace: &str,
    (verb, group, resource): (&str, &str, &str),
    name: Option<&str>,
) -> anyhow::Result<bool> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some(verb.to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                name: name.map(str::to_owned),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let reviewed = kube::Api::<SubjectAccessReview>::all(client.clone())
        .create(&kube::api::PostParams::default(), &review)
        .await?;
    Ok(reviewed.status.is_some_and(|s| s.allowed))
}
