//! `ballast-worker probe` against the local stack's real servers, and against a closed port.

use std::process::Command;

use ballast_e2e::Stack;

fn probe(kind: &str, url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ballast-worker"))
        .args(["probe", kind, url, "--timeout", "10s"])
        .output()
        .expect("ballast-worker runs")
}

#[test]
fn probe_reports_every_stack_server_healthy() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let targets = [
        ("kafka", "BALLAST_KAFKA_BOOTSTRAP"),
        ("redis", "BALLAST_REDIS_KV_URL"),
        ("mysql", "BALLAST_MYSQL_HOT_URL"),
        ("elasticsearch", "BALLAST_ES_COLD_URL"),
    ];
    for (kind, var) in targets {
        let url = stack.get(var)?;
        let out = probe(kind, &url);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{kind}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("healthy"), "{kind}: {stdout}");
        assert!(
            !stdout.contains(":ballast@"),
            "{kind} printed its password: {stdout}"
        );
    }
    Ok(())
}

#[test]
fn probe_of_a_closed_port_fails_and_names_the_server() {
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    // (kind, URL, as printed: never with its password)
    for (kind, url, shown) in [
        ("redis", "redis://:s3cret@127.0.0.1:1", "redis://:***@127.0.0.1:1"),
        (
            "mysql",
            "mysql://ballast:s3cret@127.0.0.1:1/ballast",
            "mysql://ballast:***@127.0.0.1:1/ballast",
        ),
        ("elasticsearch", "http://127.0.0.1:1", "http://127.0.0.1:1"),
    ] {
        let out = probe(kind, url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{kind} probe of a closed port succeeded");
        assert!(
            stderr.starts_with(&format!("{kind}: {shown}: ")),
            "{kind}: {stderr}"
        );
        assert!(
            !stderr.contains("s3cret"),
            "{kind} printed its password: {stderr}"
        );
    }
}

#[test]
fn probe_of_kafka_without_a_broker_times_out() {
    let out = Command::new(env!("CARGO_BIN_EXE_ballast-worker"))
        .args(["probe", "kafka", "127.0.0.1:1", "--timeout", "1500ms"])
        .output()
        .expect("ballast-worker runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("kafka: 127.0.0.1:1:"), "{stderr}");
}
