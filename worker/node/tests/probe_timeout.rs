//! A dependency that hangs (SIGSTOP: it accepts connections and never answers)
//! fails its probe as a timeout, within the timeout, for every kind of server
//! the stack runs; and the prober answers again once the server thaws. One
//! test in its own binary: it freezes servers other tests use.

use std::time::Duration;

use ballast_e2e::scenario::RestoreStack;
use ballast_e2e::{Stack, host_port, stack_script};
use ballast_node::probe::{Endpoint, ProbeError, Prober};
use ballast_node::secret::Secret;
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_millis(800);

#[tokio::test]
async fn a_hung_server_fails_its_probe_as_a_timeout_within_the_timeout() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let _restore = RestoreStack;
    let kafka = stack.get("BALLAST_KAFKA_BOOTSTRAP")?;
    let servers = [
        (
            "redis-cache",
            Endpoint::Redis {
                address: host_port(&stack.get("BALLAST_REDIS_CACHE_URL")?).to_owned(),
                database: 0,
                password: None,
            },
        ),
        (
            "mysql-hot",
            Endpoint::Mysql {
                address: host_port(&stack.get("BALLAST_MYSQL_HOT_URL")?).to_owned(),
                user: "ballast".into(),
                database: "ballast".into(),
                password: Some(Secret::from("ballast")),
            },
        ),
        (
            "es-cold",
            Endpoint::Elasticsearch {
                url: stack.get("BALLAST_ES_COLD_URL")?,
                credentials: None,
            },
        ),
        ("kafka", Endpoint::Kafka(host_port(&kafka).to_owned())),
    ];
    for (server, endpoint) in servers {
        let mut prober = Prober::new(endpoint);
        // Connected and answering first, so that the hang is met mid-connection.
        prober
            .check(Duration::from_secs(10))
            .await
            .map_err(|e| anyhow::anyhow!("{server} before: {e}"))?;
        stack_script(&["pause", server])?;
        let started = Instant::now();
        let hung = prober.check(TIMEOUT).await;
        let took = started.elapsed();
        stack_script(&["resume", server])?;
        assert!(
            matches!(hung, Err(ProbeError::Timeout(t)) if t == TIMEOUT),
            "{server}: {hung:?}"
        );
        assert!(
            took < TIMEOUT + Duration::from_millis(300),
            "{server}: the probe took {took:?}"
        );
        // Thawed: the next check reconnects and answers.
        let mut answered = false;
        for _ in 0..20 {
            if prober.check(Duration::from_secs(5)).await.is_ok() {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(answered, "{server}: no answer after it thawed");
    }
    Ok(())
}
