//! `fulcrum agent`: runs on a backend host, samples CPU, memory and disk use every second, and
//! tells load balancers how much traffic the host wants.
//!
//! Two answers, from the same figures:
//! - **HAProxy's agent-check protocol** on `--listen` (TCP): on every connection the agent
//!   writes one line such as `75% ready up #cpu 62% mem 40% disk 31%` and closes. It reads
//!   nothing, so HAProxy (with or without `agent-send`) and Fulcrum's `[pools.NAME.agent]`
//!   get their answer at once.
//! - **JSON** on `GET /status` of the optional `--http-listen` address (a separate port:
//!   an agent-check client sends nothing, so one port could not tell the two apart without
//!   making agent-check clients wait).
//!
//! The verdict itself is the pure function [`verdict::decide`].

pub mod verdict;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State as AxumState;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

pub use verdict::{decide, Figures, State, Thresholds, Verdict};

/// How long the agent waits for a client to take its line.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the agent could not start: a bad option, or a listener or the system figures that
/// cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A percentage option is outside 0-100.
    #[error("--{option} must be a percentage from 0 to 100, got {value}")]
    Percentage {
        /// The option, without its dashes.
        option: &'static str,
        /// The value given.
        value: f64,
    },
    /// `--max-weight` is outside 1-100.
    #[error("--max-weight must be from 1 to 100, got {0}")]
    MaxWeight(u8),
    /// `--min-weight` is above `--max-weight`.
    #[error("--min-weight ({min}) must not exceed --max-weight ({max})")]
    MinAboveMax {
        /// `--min-weight`.
        min: u8,
        /// `--max-weight`.
        max: u8,
    },
    /// `--sample-interval` is shorter than CPU use can be measured over.
    #[error("--sample-interval must be at least {0:?}")]
    SampleInterval(Duration),
    /// `--check-interval` or `--check-timeout` is zero.
    #[error("--check-interval and --check-timeout must be above zero")]
    CheckTiming,
    /// CPU and memory figures cannot be read on this system.
    #[error("cannot read system figures: {0}")]
    System(sysinfo::Error),
    /// `--disk-path` does not exist or cannot be resolved.
    #[error("--disk-path {}: {error}", .path.display())]
    DiskPath {
        /// The path given.
        path: PathBuf,
        /// Why it cannot be resolved.
        error: std::io::Error,
    },
    /// A listen address cannot be bound.
    #[error("cannot listen on {address}: {error}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// Why binding failed.
        error: std::io::Error,
    },
    /// The address of a bound socket cannot be read.
    #[error("cannot read a listening address: {0}")]
    LocalAddr(std::io::Error),
}

/// The options of `fulcrum agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Address of the agent-check listener (TCP, HAProxy's protocol); port 0 picks a free port.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address of the HTTP listener answering `GET /status` with JSON (none when absent).
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// CPU use (percent) above which the weight falls linearly, to --min-weight at 100% CPU
    /// (100 = CPU never lowers the weight).
    #[arg(long, default_value_t = 50.0)]
    pub cpu_weight_from: f64,
    /// Memory use (percent) above which the weight falls linearly, to --min-weight at 100%
    /// memory (100 = memory never lowers the weight).
    #[arg(long, default_value_t = 70.0)]
    pub mem_weight_from: f64,
    /// Lowest weight percent advertised because of load.
    #[arg(long, default_value_t = 10)]
    pub min_weight: u8,
    /// Highest weight percent advertised (e.g. 50 on a host half as big as the others).
    #[arg(long, default_value_t = 100)]
    pub max_weight: u8,
    /// Memory use (percent) above which the agent answers `drain`.
    #[arg(long, default_value_t = 90.0)]
    pub mem_drain: f64,
    /// Disk use (percent) of --disk-path's filesystem above which the agent answers `drain`.
    #[arg(long, default_value_t = 90.0)]
    pub disk_drain: f64,
    /// A path on the filesystem whose use is watched.
    #[arg(long, default_value = "/")]
    pub disk_path: PathBuf,
    /// A shell command (run with `sh -c`) that must exit 0, e.g. a process check; while it
    /// fails or times out the agent answers `down`.
    #[arg(long)]
    pub check_command: Option<String>,
    /// How often the check command runs.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub check_interval: Duration,
    /// A check command running longer than this is killed and counts as failed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub check_timeout: Duration,
    /// While this file exists the agent answers `maint` (an operator's maintenance switch:
    /// `touch` it before working on the host, remove it after).
    #[arg(long)]
    pub maint_file: Option<PathBuf>,
    /// While this file exists the agent answers `drain`: no new traffic, in-flight requests
    /// finish (an operator's switch before a deploy or a restart).
    #[arg(long)]
    pub drain_file: Option<PathBuf>,
    /// How often CPU, memory and disk are sampled.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub sample_interval: Duration,
}

impl AgentArgs {
    /// The thresholds, validated.
    pub fn thresholds(&self) -> Result<Thresholds, AgentError> {
        let percent = |option: &'static str, value: f64| {
            if !(0.0..=100.0).contains(&value) {
                return Err(AgentError::Percentage { option, value });
            }
            Ok(())
        };
        percent("cpu-weight-from", self.cpu_weight_from)?;
        percent("mem-weight-from", self.mem_weight_from)?;
        percent("mem-drain", self.mem_drain)?;
        percent("disk-drain", self.disk_drain)?;
        if self.max_weight == 0 || self.max_weight > 100 {
            return Err(AgentError::MaxWeight(self.max_weight));
        }
        if self.min_weight > self.max_weight {
            return Err(AgentError::MinAboveMax {
                min: self.min_weight,
                max: self.max_weight,
            });
        }
        if self.sample_interval < sysinfo::MINIMUM_CPU_UPDATE_INTERVAL {
            return Err(AgentError::SampleInterval(
                sysinfo::MINIMUM_CPU_UPDATE_INTERVAL,
            ));
        }
        if self.check_interval.is_zero() || self.check_timeout.is_zero() {
            return Err(AgentError::CheckTiming);
        }
        Ok(Thresholds {
            cpu_weight_from: self.cpu_weight_from,
            mem_weight_from: self.mem_weight_from,
            min_weight: self.min_weight,
            max_weight: self.max_weight,
            mem_drain: self.mem_drain,
            disk_drain: self.disk_drain,
        })
    }
}

/// Where a running agent listens.
#[derive(Debug, Clone, Copy)]
pub struct AgentAddresses {
    /// The agent-check (TCP) listener.
    pub agent: SocketAddr,
    /// The HTTP `/status` listener, if any.
    pub http: Option<SocketAddr>,
}

/// The figures last sampled, shared by the sampler, the check command and the listeners.
#[derive(Debug)]
struct Shared {
    figures: Mutex<Figures>,
    thresholds: Thresholds,
    maint_file: Option<PathBuf>,
    drain_file: Option<PathBuf>,
    disk_path: PathBuf,
    check_command: Option<String>,
}

impl Shared {
    /// The figures now (the maintenance and drain files are looked at on every answer, so
    /// they take effect at once) and the verdict.
    fn current(&self) -> (Figures, Verdict) {
        let mut figures = self
            .figures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        figures.maint = self
            .maint_file
            .as_deref()
            .filter(|p| p.exists())
            .map(|p| format!("maint file {} exists", p.display()));
        figures.drain = self
            .drain_file
            .as_deref()
            .filter(|p| p.exists())
            .map(|p| format!("drain file {} exists", p.display()));
        let verdict = decide(&figures, &self.thresholds);
        (figures, verdict)
    }
}

/// Samples CPU, memory and the disk under one path with `sysinfo`.
struct Sampler {
    system: sysinfo::System,
    disks: Option<sysinfo::Disks>,
    disk_path: PathBuf,
}

impl Sampler {
    fn new(disk_path: &Path) -> Result<Sampler, AgentError> {
        let system = sysinfo::System::new().map_err(AgentError::System)?;
        let disk_path = disk_path
            .canonicalize()
            .map_err(|error| AgentError::DiskPath {
                path: disk_path.to_path_buf(),
                error,
            })?;
        let disks = sysinfo::Disks::new_with_refreshed_list().ok();
        Ok(Sampler {
            system,
            disks,
            disk_path,
        })
    }

    /// CPU use since the previous call, memory use and disk use, in percent.
    fn sample(&mut self) -> (f64, f64, Option<f64>) {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let cpu = f64::from(self.system.global_cpu_usage());
        let total = self.system.total_memory();
        let memory = if total == 0 {
            0.0
        } else {
            100.0 * total.saturating_sub(self.system.available_memory()) as f64 / total as f64
        };
        let disk = self.disks.as_mut().and_then(|disks| {
            disks.refresh(false);
            // The filesystem holding the path: the longest mount point that is a prefix of it.
            disks
                .iter()
                .filter(|d| self.disk_path.starts_with(d.mount_point()))
                .max_by_key(|d| d.mount_point().as_os_str().len())
                .filter(|d| d.total_space() > 0)
                .map(|d| {
                    100.0 * d.total_space().saturating_sub(d.available_space()) as f64
                        / d.total_space() as f64
                })
        });
        (cpu, memory, disk)
    }
}

/// Runs the check command once: none when it exited 0, else why it failed.
async fn run_check_command(command: &str, timeout: Duration) -> Option<String> {
    let mut child = tokio::process::Command::new("sh");
    child
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, child.status()).await {
        Err(_) => Some(format!("check-command timed out after {timeout:?}")),
        Ok(Err(error)) => Some(format!("check-command cannot run: {error}")),
        Ok(Ok(status)) if status.success() => None,
        Ok(Ok(status)) => Some(match status.code() {
            Some(code) => format!("check-command exited {code}"),
            None => "check-command killed by a signal".to_string(),
        }),
    }
}

/// Starts the agent: a first sample (and check command run) is taken before the listeners
/// answer, so the first answer is already meaningful. Runs until the runtime stops.
pub async fn start(args: &AgentArgs) -> Result<AgentAddresses, AgentError> {
    let thresholds = args.thresholds()?;
    let mut sampler = Sampler::new(&args.disk_path)?;
    sampler.sample();
    tokio::time::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL).await;
    let (cpu_percent, memory_percent, disk_percent) = sampler.sample();
    if disk_percent.is_none() {
        tracing::warn!(path = %args.disk_path.display(), "disk use of this path cannot be read; disk-drain is off");
    }
    let check_failure = match &args.check_command {
        Some(command) => run_check_command(command, args.check_timeout).await,
        None => None,
    };
    let shared = Arc::new(Shared {
        figures: Mutex::new(Figures {
            cpu_percent,
            memory_percent,
            disk_percent,
            check_failure,
            maint: None,
            drain: None,
        }),
        thresholds,
        maint_file: args.maint_file.clone(),
        drain_file: args.drain_file.clone(),
        disk_path: args.disk_path.clone(),
        check_command: args.check_command.clone(),
    });

    let (agent_listener, agent) = bind(args.listen).await?;
    let http = match args.http_listen {
        Some(address) => {
            let (listener, local) = bind(address).await?;
            let app = Router::new()
                .route("/status", get(status))
                .with_state(shared.clone());
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, app).await {
                    tracing::error!(%error, "agent HTTP listener failed");
                }
            });
            Some(local)
        }
        None => None,
    };

    tokio::spawn(sample_loop(sampler, shared.clone(), args.sample_interval));
    if let Some(command) = args.check_command.clone() {
        tokio::spawn(check_loop(
            command,
            shared.clone(),
            args.check_interval,
            args.check_timeout,
        ));
    }
    tokio::spawn(serve_agent(agent_listener, shared.clone()));
    let (_, verdict) = shared.current();
    tracing::info!(
        weight = verdict.weight_percent,
        state = verdict.state.name(),
        reason = %verdict.reason,
        "agent ready"
    );
    Ok(AgentAddresses { agent, http })
}

/// Binds `address`; returns the listener and the address it got.
async fn bind(address: SocketAddr) -> Result<(TcpListener, SocketAddr), AgentError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|error| AgentError::Listen { address, error })?;
    let local = listener.local_addr().map_err(AgentError::LocalAddr)?;
    Ok((listener, local))
}

/// Samples every `interval`; logs every change of state.
async fn sample_loop(mut sampler: Sampler, shared: Arc<Shared>, interval: Duration) {
    let mut last_state = shared.current().1.state;
    loop {
        tokio::time::sleep(interval).await;
        let (cpu, memory, disk) = sampler.sample();
        {
            let mut figures = shared.figures.lock().unwrap_or_else(|e| e.into_inner());
            figures.cpu_percent = cpu;
            figures.memory_percent = memory;
            figures.disk_percent = disk;
        }
        let (_, verdict) = shared.current();
        if verdict.state != last_state {
            tracing::info!(
                from = last_state.name(),
                to = verdict.state.name(),
                weight = verdict.weight_percent,
                reason = %verdict.reason,
                "agent state changed"
            );
            last_state = verdict.state;
        }
    }
}

/// Runs the check command every `interval`.
async fn check_loop(command: String, shared: Arc<Shared>, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let failure = run_check_command(&command, timeout).await;
        let mut figures = shared.figures.lock().unwrap_or_else(|e| e.into_inner());
        if figures.check_failure != failure {
            match &failure {
                Some(why) => tracing::warn!(%command, "{why}"),
                None => tracing::info!(%command, "check-command passes again"),
            }
        }
        figures.check_failure = failure;
    }
}

/// Answers every agent-check connection with the current line, then closes it.
async fn serve_agent(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (mut stream, peer) = crate::listener::accept(&listener).await;
        let line = shared.current().1.line();
        tokio::spawn(async move {
            let write = async {
                stream.write_all(line.as_bytes()).await?;
                stream.shutdown().await
            };
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%peer, %error, "agent answer not delivered"),
                Err(_) => tracing::debug!(%peer, "agent answer timed out"),
            }
        });
    }
}

/// The JSON of `GET /status`.
#[derive(Debug, Serialize)]
struct Status {
    cpu_percent: f64,
    memory_percent: f64,
    disk_percent: Option<f64>,
    disk_path: String,
    check_command: Option<String>,
    check_failure: Option<String>,
    maint: bool,
    drain: bool,
    weight_percent: u8,
    verdict: State,
    reason: String,
    line: String,
}

async fn status(AxumState(shared): AxumState<Arc<Shared>>) -> Json<Status> {
    let (figures, verdict) = shared.current();
    let round = |v: f64| (v * 10.0).round() / 10.0;
    Json(Status {
        cpu_percent: round(figures.cpu_percent),
        memory_percent: round(figures.memory_percent),
        disk_percent: figures.disk_percent.map(round),
        disk_path: shared.disk_path.display().to_string(),
        check_command: shared.check_command.clone(),
        check_failure: figures.check_failure,
        maint: figures.maint.is_some(),
        drain: figures.drain.is_some(),
        weight_percent: verdict.weight_percent,
        verdict: verdict.state,
        reason: verdict.reason.clone(),
        line: verdict.line().trim_end().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn thresholds(extra: &[&str]) -> Result<Thresholds, AgentError> {
        let words = ["agent", "--listen", "127.0.0.1:0"].iter().chain(extra);
        Cli::try_parse_from(words).unwrap().args.thresholds()
    }

    #[test]
    fn bad_options_are_refused_with_the_option_and_the_value() {
        assert!(thresholds(&[]).is_ok());
        for (extra, message) in [
            (
                &["--cpu-weight-from", "150"][..],
                "--cpu-weight-from must be a percentage from 0 to 100, got 150",
            ),
            (
                &["--disk-drain=-1"],
                "--disk-drain must be a percentage from 0 to 100, got -1",
            ),
            (
                &["--max-weight", "0"],
                "--max-weight must be from 1 to 100, got 0",
            ),
            (
                &["--min-weight", "60", "--max-weight", "50"],
                "--min-weight (60) must not exceed --max-weight (50)",
            ),
            (
                &["--check-timeout", "0s"],
                "--check-interval and --check-timeout must be above zero",
            ),
        ] {
            let error = thresholds(extra).expect_err(message);
            assert_eq!(error.to_string(), message);
        }
    }
}
