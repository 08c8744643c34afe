//! `ballast-worker probe` against the local stack's real servers, and against a closed port.

use std::process::Command;

use ballast_e2e::{Stack, host_port};

/// Runs `ballast-worker probe` with `args`, the password (if any) in the environment.
fn probe(args: &[&str], password: Option<&str>) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ballast-worker"));
    command.arg("probe").args(args).args(["--timeout", "10s"]);
    command.env_remove("BALLAST_PROBE_PASSWORD");
    if let Some(password) = password {
        command.env("BALLAST_PROBE_PASSWORD", password);
    }
    command.output().expect("ballast-worker runs")
}

/// The arguments probing the stack's MySQL at `address` (user and database `ballast`).
fn mysql_args(address: &str) -> Vec<&str> {
    vec!["mysql", address, "--user", "ballast", "--database", "ballast"]
}

#[test]
fn probe_reports_every_stack_server_healthy() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let kafka = stack.get("BALLAST_KAFKA_BOOTSTRAP")?;
    let kv = stack.get("BALLAST_REDIS_KV_URL")?;
    let hot = stack.get("BALLAST_MYSQL_HOT_URL")?;
    let es = stack.get("BALLAST_ES_COLD_URL")?;
    // The stack's MySQL user is ballast/ballast.
    let targets: [(&str, Vec<&str>, Option<&str>); 4] = [
        ("kafka", vec!["kafka", host_port(&kafka)], None),
        ("redis", vec!["redis", host_port(&kv)], None),
        ("mysql", mysql_args(host_port(&hot)), Some("ballast")),
        ("elasticsearch", vec!["elasticsearch", &es], None),
    ];
    for (kind, args, password) in targets {
        let out = probe(&args, password);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{kind}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.starts_with(&format!("{kind}: ")), "{kind}: {stdout}");
        assert!(stdout.contains("healthy"), "{kind}: {stdout}");
    }
    Ok(())
}

#[test]
fn probe_of_a_closed_port_fails_names_the_server_and_never_prints_the_password() {
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    // The password holds URL characters: typed options send it as written.
    let password = "s3cret@p/w";
    // (kind, arguments, as printed)
    let cases: [(&str, &[&str], &str); 3] = [
        ("redis", &["redis", "127.0.0.1:1"], "127.0.0.1:1/0"),
        (
            "mysql",
            &[
                "mysql",
                "127.0.0.1:1",
                "--user",
                "ballast",
                "--database",
                "ballast",
            ],
            "ballast@127.0.0.1:1/ballast",
        ),
        (
            "elasticsearch",
            &["elasticsearch", "http://127.0.0.1:1", "--user", "elastic"],
            "http://127.0.0.1:1 as elastic",
        ),
    ];
    for (kind, args, shown) in cases {
        let out = probe(args, Some(password));
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
fn probe_with_the_wrong_password_is_refused_by_the_server_without_printing_it() -> anyhow::Result<()> {
    let stack = Stack::discover();
    let hot = stack.get("BALLAST_MYSQL_HOT_URL")?;
    let out = probe(&mysql_args(host_port(&hot)), Some("wr0ng@pass"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong password was accepted: {stderr}");
    assert!(stderr.contains("Access denied"), "{stderr}");
    assert!(!stderr.contains("wr0ng"), "printed its password: {stderr}");
    Ok(())
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
