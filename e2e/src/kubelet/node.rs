//! The Node the stand-in kubelets bind pods to, kept Ready by heartbeats so
//! that the node lifecycle controller neither marks its pods unready nor
//! evicts them. One Node serves every namespace's kubelet: it is
//! cluster-scoped, and nothing namespaced could own and remove it.

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// The node's name.
pub const NAME: &str = "ballast-e2e";

/// Creates the Node if it is missing and reports it Ready now.
pub async fn heartbeat(nodes: &Api<Node>) -> Result<(), kube::Error> {
    if nodes.get_opt(NAME).await?.is_none() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(NAME.into()),
                labels: Some([("kubernetes.io/hostname".to_owned(), NAME.to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            // Another namespace's kubelet made it first.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = json!({"status": {"conditions": [{
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "message": "ballast e2e stand-in kubelet is posting ready status",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }]}});
    nodes
        .patch_status(NAME, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}
