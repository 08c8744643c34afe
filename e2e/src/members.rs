//! Member-store fixtures: a MemberStore whose two data centres are the
//! stack's `member-dc-a` (primary) and `member-dc-b` servers, its own home
//! database, and its member processes run as the kubelet would run them.

use crate::{KillOnDrop, Stack, StackError, host_port, in_own_group};

/// The MySQL URL of the primary data centre's member database.
pub const PRIMARY_MYSQL: &str = "BALLAST_MYSQL_MEMBER_DC_A_URL";
/// The MySQL URL of the replica data centre's member database.
pub const REPLICA_MYSQL: &str = "BALLAST_MYSQL_MEMBER_DC_B_URL";

/// A running member process's ports.
pub struct MemberProcess {
    /// The process, killed when dropped.
    pub process: KillOnDrop,
    /// Its gRPC port.
    pub grpc: u16,
    /// Its `/metrics` and `/readyz` port.
    pub metrics: u16,
}

impl Stack {
    /// MemberStore `name` over both member data centres (dc-a primary, dc-b
    /// its replica), home database `home`, change stream `<name>-changes`,
    /// the cold cluster standing in for the marketing cluster, and the
    /// failover account `ballast_admin`; the passwords come from the Secret
    /// `mysql` every fixture namespace holds.
    pub fn member_store(&self, name: &str, home: &str) -> Result<serde_json::Value, StackError> {
        let dc = |dc: &str, mysql: &str, es: &str, redis: &str| -> Result<serde_json::Value, StackError> {
            Ok(serde_json::json!({
                "name": dc, "namespace": format!("{name}-{dc}"),
                "mysql": {"address": host_port(&self.get(mysql)?), "database": home, "user": "ballast",
                          "passwordSecretRef": {"name": "mysql", "key": "password"}},
                "elasticsearch": {"url": self.get(es)?},
                "redis": {"address": host_port(&self.get(redis)?)},
            }))
        };
        Ok(serde_json::json!({
            "apiVersion": "ballast.dev/v1alpha1", "kind": "MemberStore",
            "metadata": {"name": name},
            "spec": {
                "image": "ballast/worker:test",
                "primary": "dc-a",
                "dataCenters": [
                    dc("dc-a", PRIMARY_MYSQL, "BALLAST_ES_DC_A_URL", "BALLAST_REDIS_MEMBER_DC_A_URL")?,
                    dc("dc-b", REPLICA_MYSQL, "BALLAST_ES_DC_B_URL", "BALLAST_REDIS_MEMBER_DC_B_URL")?,
                ],
                "changeStream": {"bootstrapServers": self.get("BALLAST_KAFKA_BOOTSTRAP")?, "topic": format!("{name}-changes")},
                "marketingElasticsearch": {"url": self.get("BALLAST_ES_COLD_URL")?},
                "mysqlAdmin": {"user": "ballast_admin",
                               "passwordSecretRef": {"name": "mysql", "key": "admin-password"}},
            }
        }))
    }

    /// Creates the home database `home` on the primary and waits until the
    /// replica has it too (it arrives by replication).
    pub async fn member_home(&self, home: &str) -> Result<(), StackError> {
        use mysql_async::prelude::Queryable;
        let failed = |e: mysql_async::Error| StackError::Script {
            command: format!("member home database {home}"),
            message: e.to_string(),
        };
        let opts = |var: &str| -> Result<mysql_async::Opts, StackError> {
            mysql_async::Opts::from_url(&self.get(var)?).map_err(|e| failed(e.into()))
        };
        let mut primary = mysql_async::Conn::new(opts(PRIMARY_MYSQL)?)
            .await
            .map_err(failed)?;
        primary
            .query_drop(format!("CREATE DATABASE IF NOT EXISTS `{home}`"))
            .await
            .map_err(failed)?;
        let mut replica = mysql_async::Conn::new(opts(REPLICA_MYSQL)?)
            .await
            .map_err(failed)?;
        for _ in 0..100 {
            let found: Option<String> = replica
                .exec_first(
                    "SELECT schema_name FROM information_schema.schemata WHERE schema_name = ?",
                    (home,),
                )
                .await
                .map_err(failed)?;
            if found.is_some() {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(StackError::Script {
            command: format!("member home database {home}"),
            message: "the replica did not get it within 10 s".into(),
        })
    }

    /// Runs `ballast-worker member` for MemberStore `store` in `namespace`,
    /// data centre `dc`, on free loopback ports; its log goes to the temp directory.
    pub fn member(
        &self,
        binary: &std::path::Path,
        namespace: &str,
        store: &str,
        dc: &str,
        env: &[(&str, &str)],
    ) -> Result<MemberProcess, StackError> {
        let failed = |e: std::io::Error| StackError::Script {
            command: "ballast-worker member".into(),
            message: e.to_string(),
        };
        let grpc = crate::scenario::free_port().map_err(failed)?;
        let metrics = crate::scenario::free_port().map_err(failed)?;
        let log =
            std::fs::File::create(std::env::temp_dir().join(format!("ballast-{namespace}-{store}-{dc}.log")))
                .map_err(failed)?;
        let child = in_own_group(&mut std::process::Command::new(binary))
            .arg("member")
            .env("KUBECONFIG", self.get("KUBECONFIG")?)
            .env("BALLAST_MEMBER_STORE", store)
            .env("BALLAST_MEMBER_STORE_NAMESPACE", namespace)
            .env("BALLAST_DATA_CENTER", dc)
            .env("BALLAST_LISTEN_ADDR", format!("127.0.0.1:{grpc}"))
            .env("BALLAST_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
            .env("BALLAST_MEMBER_MYSQL_PASSWORD", "ballast")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::from(log.try_clone().map_err(failed)?))
            .stderr(std::process::Stdio::from(log))
            .spawn()
            .map_err(failed)?;
        Ok(MemberProcess {
            process: KillOnDrop(child),
            grpc,
            metrics,
        })
    }
}
