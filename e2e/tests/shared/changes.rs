//! Change records published straight onto a MemberStore's change stream,
//! as member services would: what the scenarios feed the replicator.

use ballast_worker::members::model::Member;
use ballast_worker::members::stream::{ChangeStream, Path, Record};

/// Publishes members 1 to `n` (version 1) on the change stream.
pub async fn publish(stream: &ChangeStream, n: u64) -> anyhow::Result<()> {
    for id in 1..=n {
        let member = Member {
            id,
            name: format!("member {id}"),
            level: "gold".into(),
            identities: Default::default(),
            version: 1,
            updated_ms: 1_700_000_000_000,
        };
        stream
            .publish(&Record {
                path: Path::Mysql,
                member,
                epoch: 0,
            })
            .await?;
    }
    Ok(())
}
