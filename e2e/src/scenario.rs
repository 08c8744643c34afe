//! What scenario tests and the demo wait on: a condition polled until a
//! deadline, a pipeline's or a worker's readiness, a free port, and a metric
//! scraped from a worker's `/metrics`; and the guards that restart servers a
//! scenario stopped and thaw one it froze.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Restarts (`stack.sh up`) any server a scenario stopped when dropped,
/// whatever happened: a failed assertion must not leave the stack half down.
pub struct RestoreStack;

impl Drop for RestoreStack {
    fn drop(&mut self) {
        let _ = crate::stack_script(&["up"]);
    }
}

/// Restarts any server a scenario stopped and makes DC A's member MySQL the
/// master again (`stack.sh member-topology`) when dropped, whatever
/// happened: a MySQL failover scenario stopped midway must not leave DC B's
/// the master for the scenarios after it.
pub struct RestoreMemberTopology;

impl Drop for RestoreMemberTopology {
    fn drop(&mut self) {
        let _ = crate::stack_script(&["up"]);
        let _ = crate::stack_script(&["member-topology"]);
    }
}

/// Thaws (`stack.sh resume`) the server a scenario froze when dropped,
/// whatever happened: a failed assertion must not leave it frozen.
pub struct Thaw(pub &'static str);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = crate::stack_script(&["resume", self.0]);
    }
}

/// Why waiting failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The condition did not hold in time; the last error seen, if any.
    #[error("{what}: not within {secs} s{}", last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
        /// The check's last error.
        last: Option<String>,
    },
}

/// Polls `check` every 250 ms until it yields a value or `secs` pass; errors
/// of the check count as "not yet" and the last one is reported.
pub async fn eventually<T, E, F, Fut>(what: &str, secs: u64, mut check: F) -> Result<T, WaitError>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, E>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last = Some(error.to_string()),
        }
        if Instant::now() >= deadline {
            return Err(WaitError::Timeout {
                what: what.to_owned(),
                secs,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until pipeline `name` in `namespace` reports `Ready=True`: every
/// Deployment and the StatefulSet it owns has its pods available (a
/// collector's readiness means its binlog stream is open).
pub async fn until_pipeline_ready(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    secs: u64,
) -> Result<(), WaitError> {
    let aps: kube::Api<ballast_crds::AnalyticsPipeline> = kube::Api::namespaced(client.clone(), namespace);
    eventually(
        &format!("pipeline {name} Ready (every workload available)"),
        secs,
        || async {
            let ap = aps.get(name).await?;
            let ready = ap
                .status
                .iter()
                .flat_map(|s| s.conditions.iter())
                .any(|c| c.type_ == ballast_crds::conditions::READY && c.status == "True");
            Ok::<_, kube::Error>(ready.then_some(()))
        },
    )
    .await
}

/// Waits until the worker serving `/readyz` on loopback `port` says it is
/// ready (a collector: its binlog stream is open; an intake: it consumes).
pub async fn until_ready(port: u16, secs: u64) -> Result<(), WaitError> {
    eventually(
        &format!("127.0.0.1:{port}/readyz answering 200"),
        secs,
        || async { Ok::<_, std::io::Error>((http_get(port, "/readyz").await?.0 == 200).then_some(())) },
    )
    .await
}

/// A loopback port free now (for a worker's fixed metrics address), from
/// 20000-26999: below the kernel's ephemeral range (32768 up) and the stack's
/// servers (27000 up). A port `bind(0)` hands out is ephemeral, and an
/// outgoing connection can take it before the worker binds it.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 7_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries run one after another while earlier workers may linger:
    // each process starts at its own place in the range.
    let start = std::process::id().wrapping_mul(2_654_435_761) % COUNT;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let Ok(port) = u16::try_from(FIRST + (start + n) % COUNT) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        "no free loopback port in 20000-26999",
    ))
}

/// The value of the sample named `series` (with its labels, as exposed, e.g.
/// `ballast_slave_results_refused_total{store="mysql"}`) at `127.0.0.1:port/metrics`;
/// none when it was not exposed yet.
pub async fn metric(port: u16, series: &str) -> std::io::Result<Option<f64>> {
    let (_, body) = http_get(port, "/metrics").await?;
    Ok(body.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    }))
}

/// `GET path` at `127.0.0.1:port`: the status code and the body.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let response = http_get_full(port, path).await?;
    Ok((response.code, response.body))
}

/// An HTTP response as [`http_get_full`] reads it.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// The status code.
    pub code: u16,
    /// Header names (lower-cased) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` at `127.0.0.1:port` (HTTP/1.0, so the server closes): status, headers and body.
pub async fn http_get_full(port: u16, path: &str) -> std::io::Result<HttpResponse> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response.as_str(), ""));
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|status| status.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status from port {port}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpResponse {
        code,
        headers,
        body: body.to_owned(),
    })
}
