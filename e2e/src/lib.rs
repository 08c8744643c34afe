//! Where the local stack's servers are: the endpoints `e2e/stack/stack.sh` publishes.
//!
//! `stack.sh up` writes `stack.env` (KEY=VALUE lines) into its state directory.
//! Tests read the endpoints from the process environment first (the Makefile
//! exports them) and otherwise from that file, so a bare `cargo test` works
//! against a running stack too. A missing endpoint is an error that says how
//! to start the stack: a test that needs a server never skips silently.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;

/// Why the stack's endpoints could not be found.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The kubeconfig named by `KUBECONFIG` cannot be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// Path of the kubeconfig.
        path: String,
        /// What went wrong.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// A client could not be built from the kubeconfig.
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    /// The key is neither in the environment nor in the stack's env file.
    #[error(
        "{key} is not set and not in {file}: start the local stack with `make stack-up` (or run `make test`)"
    )]
    Missing {
        /// The environment key that was looked up.
        key: String,
        /// The env file that was consulted.
        file: String,
    },
}

/// Endpoints of the running local stack.
#[derive(Debug, Clone)]
pub struct Stack {
    file: PathBuf,
    values: HashMap<String, String>,
}

impl Stack {
    /// Loads `stack.env` from `$BALLAST_STACK_ENV`, else from the default state
    /// directory (`$BALLAST_STATE_DIR` or `~/.cache/ballast/stack`). An absent
    /// file is not an error here: each lookup then falls back to the environment
    /// and fails with [`StackError::Missing`] when the key is not there either.
    pub fn discover() -> Self {
        let file = std::env::var_os("BALLAST_STACK_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| state_dir().join("stack.env"));
        let values = std::fs::read_to_string(&file)
            .map(|text| parse_env(&text))
            .unwrap_or_default();
        Self { file, values }
    }

    /// The value of `key`: the environment wins over the stack's file.
    pub fn get(&self, key: &str) -> Result<String, StackError> {
        std::env::var(key)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| self.values.get(key).cloned())
            .ok_or_else(|| StackError::Missing {
                key: key.to_owned(),
                file: self.file.display().to_string(),
            })
    }
}

impl Stack {
    /// A client of the stack's API server, from the `KUBECONFIG` it publishes.
    pub async fn kube_client(&self) -> Result<kube::Client, StackError> {
        use kube::config::{KubeConfigOptions, Kubeconfig};
        let path = self.get("KUBECONFIG")?;
        let kubeconfig = |source| StackError::Kubeconfig {
            path: path.clone(),
            source,
        };
        let config = Kubeconfig::read_from(&path).map_err(kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
            .await
            .map_err(kubeconfig)?;
        Ok(kube::Client::try_from(config)?)
    }
}

fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BALLAST_STATE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/ballast/stack")
}

/// Parses `KEY=VALUE` lines; blank lines and `#` comments are ignored.
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| {
            let v = v.trim().trim_matches('"');
            (k.trim().to_owned(), v.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_env_skips_comments_and_blank_lines() {
        let parsed = parse_env("# ports\n\nA=1\n B = \"two\" \nnot a pair\n");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed["A"], "1");
        assert_eq!(parsed["B"], "two");
    }

    #[test]
    fn missing_key_names_the_key_and_how_to_start_the_stack() {
        let stack = Stack {
            file: PathBuf::from("/nowhere/stack.env"),
            values: HashMap::new(),
        };
        let err = stack
            .get("BALLAST_TEST_SURELY_UNSET_KEY")
            .unwrap_err()
            .to_string();
        assert!(err.contains("BALLAST_TEST_SURELY_UNSET_KEY"), "{err}");
        assert!(err.contains("make stack-up"), "{err}");
    }
}
