//! A real browser for tests of pages: Debian's Chromium, headless, driven
//! over the W3C WebDriver protocol by Debian's chromedriver (which the stack
//! installs). The protocol is plain JSON over HTTP; the few calls a page test
//! needs are made here directly.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::KillOnDrop;

/// Where Debian installs the browser and its driver.
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The key a WebDriver element reference is held under.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Why the browser could not be driven.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    /// The driver could not be started or reached.
    #[error("chromedriver: {0}")]
    Io(#[from] std::io::Error),
    /// The driver answered with an error or something unreadable.
    #[error("WebDriver {call}: {message}")]
    WebDriver {
        /// The call.
        call: String,
        /// Its error.
        message: String,
    },
    /// The driver did not come up in time.
    #[error(transparent)]
    Wait(#[from] crate::scenario::WaitError),
}

/// A headless Chromium session; the driver and the browser stop when dropped.
pub struct Browser {
    port: u16,
    session: String,
    _driver: KillOnDrop,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a headless session.
    pub async fn start() -> Result<Self, BrowserError> {
        let port = crate::scenario::free_port()?;
        let mut command = std::process::Command::new(CHROMEDRIVER);
        crate::in_own_group(&mut command)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let driver = KillOnDrop(command.spawn()?);
        crate::scenario::eventually("chromedriver answering /status", 20, || async {
            let (_, body) = call(port, "GET", "/status", None).await?;
            Ok::<_, BrowserError>(body["value"]["ready"].as_bool().unwrap_or(false).then_some(()))
        })
        .await?;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            },
        }}});
        let (_, body) = call(port, "POST", "/session", Some(&capabilities)).await?;
        let session = body["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| BrowserError::WebDriver {
                call: "new session".into(),
                message: body.to_string(),
            })?
            .to_owned();
        Ok(Self {
            port,
            session,
            _driver: driver,
        })
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) -> Result<(), BrowserError> {
        self.session_call("POST", "/url", Some(&json!({ "url": url })))
            .await?;
        Ok(())
    }

    /// The rendered text of the first element matching CSS `selector`, if any.
    pub async fn text(&self, selector: &str) -> Result<Option<String>, BrowserError> {
        let found = self
            .session_call(
                "POST",
                "/element",
                Some(&json!({"using": "css selector", "value": selector})),
            )
            .await;
        let element = match found {
            Ok(value) => value[ELEMENT].as_str().map(str::to_owned),
            // "no such element": not rendered (yet).
            Err(BrowserError::WebDriver { message, .. }) if message.contains("no such element") => None,
            Err(error) => return Err(error),
        };
        let Some(element) = element else {
            return Ok(None);
        };
        let text = self
            .session_call("GET", &format!("/element/{element}/text"), None)
            .await?;
        Ok(text.as_str().map(str::to_owned))
    }

    async fn session_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, BrowserError> {
        let path = format!("/session/{}{path}", self.session);
        let (status, reply) = call(self.port, method, &path, body).await?;
        if status == 200 {
            Ok(reply["value"].clone())
        } else {
            Err(BrowserError::WebDriver {
                call: format!("{method} {path}"),
                message: reply["value"]["error"].as_str().unwrap_or_default().to_owned()
                    + ": "
                    + reply["value"]["message"].as_str().unwrap_or_default(),
            })
        }
    }
}

/// One WebDriver call: status and JSON body, within 30 s.
async fn call(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), BrowserError> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let payload = body.map(Value::to_string).unwrap_or_default();
        stream
            .write_all(
                format!(
                    "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
                    payload.len()
                )
                .as_bytes(),
            )
            .await?;
        // chromedriver keeps the connection open: read exactly one response.
        let mut response = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buf[..n]);
            if complete(&response) {
                break;
            }
        }
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{method} {path}")))??;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    let head = String::from_utf8_lossy(&response[..split]);
    let body = response.get(split + 4..).unwrap_or_default();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status from chromedriver for {path}")))?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { dechunk(body) } else { body.to_vec() };
    let body = String::from_utf8_lossy(&body);
    let value = serde_json::from_str(&body).map_err(|e| BrowserError::WebDriver {
        call: format!("{method} {path}"),
        message: format!("unreadable reply ({e}): {body}"),
    })?;
    Ok((status, value))
}

/// Whether `response` holds a whole HTTP/1.1 response: its headers, and
/// the body its `Content-Length` gives or a chunked body's last chunk. Pure.
fn complete(response: &[u8]) -> bool {
    let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let body = &response[split + 4..];
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(length) => body.len() >= length,
        None => body.ends_with(b"0\r\n\r\n"),
    }
}

/// The body of a chunked HTTP/1.1 response. Pure.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let rest = &body[line_end + 2..];
        match size {
            Some(size) if size > 0 && rest.len() >= size => {
                out.extend_from_slice(&rest[..size]);
                body = rest[size..].strip_prefix(b"\r\n").unwrap_or(&rest[size..]);
            }
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_complete_once_its_body_is_all_there() {
        let cases: [(&[u8], bool); 6] = [
            (b"HTTP/1.1 200 OK\r\nContent-Length:5\r\n\r\nhello", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", false),
            (b"HTTP/1.1 200 OK\r\nContent-Len", false),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n",
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
                true,
            ),
            (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", true),
        ];
        for (response, want) in cases {
            assert_eq!(complete(response), want, "{}", String::from_utf8_lossy(response));
        }
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), b"hello world");
        assert_eq!(dechunk("2\r\né\r\n0\r\n\r\n".as_bytes()), "é".as_bytes());
        assert_eq!(dechunk(b"0\r\n\r\n"), b"");
        assert_eq!(dechunk(b"zz\r\n"), b"");
    }
}
