//! Elasticsearch: each cluster of the stack indexes, refreshes and finds a document.

use ballast_e2e::Stack;
use elasticsearch::http::transport::Transport;
use elasticsearch::indices::IndicesCreateParts;
use elasticsearch::params::Refresh;
use elasticsearch::{Elasticsearch, IndexParts, SearchParts};
use serde_json::{Value, json};

const CLUSTERS: [&str; 3] = [
    "BALLAST_ES_DC_A_URL",
    "BALLAST_ES_DC_B_URL",
    "BALLAST_ES_COLD_URL",
];

fn client(url: &str) -> anyhow::Result<Elasticsearch> {
    Ok(Elasticsearch::new(Transport::single_node(url)?))
}

#[tokio::test]
async fn every_cluster_indexes_refreshes_and_searches() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let index = super::unique("smoke-members");
    for var in CLUSTERS {
        let es = client(&stack.get(var)?)?;
        let created = es
            .indices()
            .create(IndicesCreateParts::Index(&index))
            .body(json!({
                "settings": { "number_of_shards": 1, "number_of_replicas": 0 },
                "mappings": { "properties": {
                    "member_id": { "type": "long" },
                    "phone": { "type": "keyword" }
                }}
            }))
            .send()
            .await?;
        anyhow::ensure!(
            created.status_code().is_success(),
            "{var}: create index: {}",
            created.text().await?
        );

        let indexed = es
            .index(IndexParts::IndexId(&index, "42"))
            .refresh(Refresh::True)
            .body(json!({ "member_id": 42, "phone": "13800000000" }))
            .send()
            .await?;
        anyhow::ensure!(
            indexed.status_code().is_success(),
            "{var}: index: {}",
            indexed.text().await?
        );

        let found: Value = es
            .search(SearchParts::Index(&[&index]))
            .body(json!({ "query": { "bool": { "filter": { "term": { "phone": "13800000000" } } } } }))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(found["hits"]["total"]["value"], 1, "{var}: {found}");
        assert_eq!(
            found["hits"]["hits"][0]["_source"]["member_id"], 42,
            "{var}: {found}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn clusters_are_independent() -> anyhow::Result<()> {
    // DC-A and DC-B must be separate clusters: failover promotes one over the other.
    let stack = Stack::discover();
    let mut names = Vec::new();
    for var in CLUSTERS {
        let info: Value = client(&stack.get(var)?)?.info().send().await?.json().await?;
        let name = info["cluster_name"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(!name.is_empty(), "{var}: no cluster_name in {info}");
        names.push(name);
    }
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        CLUSTERS.len(),
        "cluster names must differ: {names:?}"
    );
    Ok(())
}
