//! Running the stack's tools to completion: `stack.sh` (failure injection and
//! recovery), promtool, helm, kubectl, and the real node's image tools, through
//! one runner that reports their output.

use crate::{Stack, StackError};

/// What a finished command printed.
pub(crate) struct Printed {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `program` with `args` (and `env` added to its environment) to
/// completion, feeding it `stdin` if given:
/// what it printed, or an error with its output. `label` names it in errors;
/// `missing` says how to get it when it cannot be started.
pub(crate) fn run(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
    label: &str,
    missing: &str,
) -> Result<Printed, StackError> {
    use std::io::Write;
    let command = format!("{label} {}", args.join(" "));
    let failed = |message: String| StackError::Script {
        command: command.clone(),
        message,
    };
    let input = if stdin.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    };
    let mut child = std::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(input)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run {program} ({e}){missing}")))?;
    // Closed once fed, so that the program sees its end.
    if let Some(mut pipe) = child.stdin.take()
        && let Some(text) = stdin
    {
        pipe.write_all(text.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| failed(e.to_string()))?;
    let printed = Printed {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if out.status.success() {
        Ok(printed)
    } else {
        Err(failed(
            format!("failed:\n{}{}", printed.stdout, printed.stderr)
                .trim()
                .to_owned(),
        ))
    }
}

/// Runs `e2e/stack/stack.sh <args>`: failure injection (`stop kafka`) and recovery (`up`).
pub fn stack_script(args: &[&str]) -> Result<(), StackError> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/stack/stack.sh");
    let mut with_script = vec![script];
    with_script.extend_from_slice(args);
    run("bash", &with_script, &[], None, "stack.sh", "").map(drop)
}

/// Runs promtool with `args` (and `stdin`, if given): its output, or an error
/// with it. A promtool that cannot be started is an error that says how to
/// install it (`BALLAST_PROMTOOL` overrides the one on `PATH`).
pub fn promtool(args: &[&str], stdin: Option<&str>) -> Result<String, StackError> {
    let binary = std::env::var("BALLAST_PROMTOOL")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "promtool".to_owned());
    let missing = ": run `make stack-up`, which installs Debian's prometheus package \
                   (/usr/bin/promtool), or set BALLAST_PROMTOOL";
    let printed = run(&binary, args, &[], stdin, "promtool", missing)?;
    Ok(format!("{}{}", printed.stdout, printed.stderr))
}

impl Stack {
    /// Runs the stack's helm with `args`: its stdout, or an error with its output.
    pub fn helm(&self, args: &[&str]) -> Result<String, StackError> {
        let binary = self.get("BALLAST_HELM")?;
        Ok(run(
            &binary,
            args,
            &[],
            None,
            "helm",
            ": run `make stack-up`, which installs helm",
        )?
        .stdout)
    }

    /// Runs the stack's kubectl with `args` (against the stack's API server);
    /// its stdout, or an error with its output.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, StackError> {
        self.kubectl_with(args, None)
    }

    /// [`Stack::kubectl`] fed `stdin` (a manifest for `-f -`).
    pub fn kubectl_with(&self, args: &[&str], stdin: Option<&str>) -> Result<String, StackError> {
        let binary = self.get("BALLAST_KUBECTL")?;
        let kubeconfig = format!("--kubeconfig={}", self.get("KUBECONFIG")?);
        let args: Vec<&str> = std::iter::once(kubeconfig.as_str())
            .chain(args.iter().copied())
            .collect();
        Ok(run(
            &binary,
            &args,
            &[],
            stdin,
            "kubectl",
            ": run `make stack-up`, which builds kubectl",
        )?
        .stdout)
    }
}
