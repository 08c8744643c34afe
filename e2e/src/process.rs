//! The processes a test starts: the binaries of this build, found beside
//! the test executable, and the guard that kills a child and everything it
//! started when the test ends, whatever its outcome.

use std::path::PathBuf;

use crate::StackError;

/// The `ballast-worker` binary of this build (`cargo test --workspace` builds it
/// beside the test executables).
pub fn worker_binary() -> Result<PathBuf, StackError> {
    binary("ballast-worker")
}

/// The binary `name` of this build (`cargo test --workspace` builds every
/// package's binaries beside the test executables).
pub fn binary(name: &str) -> Result<PathBuf, StackError> {
    let missing = |detail: String| StackError::Script {
        command: format!("locate {name}"),
        message: detail,
    };
    let exe = std::env::current_exe().map_err(|e| missing(e.to_string()))?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name));
    match path {
        Some(path) if path.exists() => Ok(path),
        other => Err(missing(format!(
            "{other:?} not found: build it with `cargo build -p {name}`"
        ))),
    }
}

/// A child process killed (and reaped) when dropped, whatever the test's outcome.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Sends `signal` to the process (see [`signal`]).
    pub fn signal(&self, signal: &str) -> std::io::Result<()> {
        self::signal(self.0.id(), signal)
    }
}

/// Sends `signal` (as `kill` spells it: `-TERM`, `-STOP`, `-CONT`, `-KILL`) to process `pid`.
pub fn signal(pid: u32, signal: &str) -> std::io::Result<()> {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("kill {signal} {pid} failed")))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Already exited is fine: the point is that nothing outlives the test,
        // not even a process the child started (each child leads its own group).
        let _ = signal_group(self.0.id(), "-KILL");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `signal` to the process group led by `pid` (see [`in_own_group`]).
pub fn signal_group(pid: u32, signal: &str) -> std::io::Result<()> {
    let status = std::process::Command::new("kill")
        .args([signal, "--", &format!("-{pid}")])
        .stderr(std::process::Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("kill {signal} -- -{pid} failed")))
    }
}

/// Makes `command` start its process as the leader of a new process group,
/// so that killing the group reaches whatever it starts too.
pub fn in_own_group(command: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    command.process_group(0)
}
