//! Where autoscaled backends come from: local processes started from a command template, or
//! user commands that create and delete backends on some platform.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

/// Why a provider step failed: no port, a command that cannot start, fails or times out, or
/// a `scale_up` output without backend addresses. Commands are quoted as run.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No free port could be had on 127.0.0.1 for a backend process.
    #[error("no free port on 127.0.0.1: {0}")]
    NoFreePort(std::io::Error),
    /// The command template or command is empty.
    #[error("empty command")]
    EmptyCommand,
    /// The command cannot be started (not found, not executable, ...).
    #[error("cannot start `{command}`: {error}")]
    Start {
        /// The command line.
        command: String,
        /// Why it did not start.
        error: std::io::Error,
    },
    /// Waiting for the command or reading its output failed.
    #[error("`{command}` failed: {error}")]
    Wait {
        /// The command line.
        command: String,
        /// What failed.
        error: std::io::Error,
    },
    /// The command did not finish within the timeout (it is killed).
    #[error("`{command}` timed out after {timeout:?}")]
    Timeout {
        /// The command line.
        command: String,
        /// The `command_timeout`.
        timeout: Duration,
    },
    /// The command exited unsuccessfully.
    #[error("`{command}` exited with {status}: {stderr}")]
    Exit {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// The last line of its stderr (at most 300 characters).
        stderr: String,
    },
    /// A line of `scale_up`'s output is not "IP:PORT".
    #[error("scale_up output line {line}: expected \"IP:PORT\", got {text:?}: {error}")]
    BadAddress {
        /// 1-based line number.
        line: usize,
        /// The line, trimmed.
        text: String,
        /// Why it is not a socket address.
        error: std::net::AddrParseError,
    },
    /// `scale_up` printed no address.
    #[error("scale_up printed no backend address (expected one \"IP:PORT\" per line)")]
    NoAddress,
}

/// Replaces `{port}`, `{name}`, `{address}` and `{pool}` in each word of a command template.
pub fn expand(template: &[String], values: &[(&str, &str)]) -> Vec<String> {
    template
        .iter()
        .map(|word| {
            values.iter().fold(word.clone(), |word, (key, value)| {
                word.replace(&format!("{{{key}}}"), value)
            })
        })
        .collect()
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, ProviderError> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").map_err(ProviderError::NoFreePort)?;
    let address = socket.local_addr().map_err(ProviderError::NoFreePort)?;
    Ok(address.port())
}

/// A backend process started by the process provider.
#[derive(Debug)]
pub struct BackendProcess {
    /// Where it listens.
    pub address: SocketAddr,
    /// Its `{name}`.
    pub name: String,
    child: Child,
}

impl BackendProcess {
    /// Starts `template` with a free port and `name`. The child dies with us (parent-death
    /// signal) and is killed if this value is dropped.
    pub fn spawn(
        template: &[String],
        name: &str,
        pool: &str,
    ) -> Result<BackendProcess, ProviderError> {
        let port = free_port()?;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let words = expand(
            template,
            &[
                ("port", &port.to_string()),
                ("name", name),
                ("address", &address.to_string()),
                ("pool", pool),
            ],
        );
        let (program, args) = words.split_first().ok_or(ProviderError::EmptyCommand)?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        fulcrum_sys::process::terminate_with_parent(&mut command);
        let child = command.spawn().map_err(|error| ProviderError::Start {
            command: words.join(" "),
            error,
        })?;
        Ok(BackendProcess {
            address,
            name: name.to_string(),
            child,
        })
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the exit.
    pub async fn stop(mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                return;
            }
            tracing::warn!(backend = %self.address, ?grace, "backend did not stop after SIGTERM; killing it");
        }
        let _ = self.child.kill().await;
    }
}

/// Runs a user command with `timeout`; returns its stdout, or why it failed (exit status and
/// the end of its stderr).
pub async fn run_command(words: &[String], timeout: Duration) -> Result<String, ProviderError> {
    let (program, args) = words.split_first().ok_or(ProviderError::EmptyCommand)?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| ProviderError::Start {
            command: words.join(" "),
            error,
        })?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => output.map_err(|error| ProviderError::Wait {
            command: words.join(" "),
            error,
        })?,
        Err(_) => {
            return Err(ProviderError::Timeout {
                command: words.join(" "),
                timeout,
            })
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr: String = stderr
            .trim()
            .lines()
            .last()
            .unwrap_or("")
            .chars()
            .take(300)
            .collect();
        return Err(ProviderError::Exit {
            command: words.join(" "),
            status: output.status,
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Reads the backend addresses a `scale_up` command printed: one "IP:PORT" per non-empty line.
pub fn parse_addresses(stdout: &str) -> Result<Vec<SocketAddr>, ProviderError> {
    let mut addresses = Vec::new();
    for (number, line) in stdout.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let address = line.parse().map_err(|error| ProviderError::BadAddress {
            line: number + 1,
            text: line.to_string(),
            error,
        })?;
        addresses.push(address);
    }
    if addresses.is_empty() {
        return Err(ProviderError::NoAddress);
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_expand_every_placeholder() {
        let template = vec![
            "fulcrum".to_string(),
            "--listen".to_string(),
            "127.0.0.1:{port}".to_string(),
            "--name={name}".to_string(),
        ];
        assert_eq!(
            expand(&template, &[("port", "9001"), ("name", "app-1")]),
            ["fulcrum", "--listen", "127.0.0.1:9001", "--name=app-1"]
        );
    }

    #[test]
    fn scale_up_output_is_parsed_strictly() {
        assert_eq!(
            parse_addresses("10.0.0.5:80\n\n# comment\n[::1]:8080\n").unwrap(),
            vec![
                "10.0.0.5:80".parse::<SocketAddr>().unwrap(),
                "[::1]:8080".parse().unwrap()
            ]
        );
        let error = parse_addresses("ok\n").unwrap_err().to_string();
        assert!(error.contains("line 1"), "{error}");
        assert!(parse_addresses("\n").is_err());
    }

    #[tokio::test]
    async fn commands_report_failure_and_timeout() {
        let out = run_command(
            &["echo".into(), "127.0.0.1:1".into()],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(out.trim(), "127.0.0.1:1");
        let error = run_command(
            &["sh".into(), "-c".into(), "echo nope >&2; exit 3".into()],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(error.contains("nope"), "{error}");
        let error = run_command(&["sleep".into(), "5".into()], Duration::from_millis(100))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("timed out"), "{error}");
    }
}
