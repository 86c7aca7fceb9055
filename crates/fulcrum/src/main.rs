//! The `fulcrum` command line: run, check, demo, backend.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use fulcrum::backend::{spawn_backend, BackendOptions};
use fulcrum::config::{Config, LogFormat};
use fulcrum::server::Server;

/// Fulcrum: a fast, load-aware load balancer.
#[derive(Debug, Parser)]
#[command(name = "fulcrum", version, about)]
struct Cli {
    /// Log format (overrides the config file's `server.log_format`). RUST_LOG sets the level.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the load balancer with a configuration file.
    Run {
        /// Path of the TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit 0 (valid) or 1 (invalid, with file:line:column).
    Check {
        /// Path of the TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start demo backends and a balancer in front of them; no configuration needed.
    Demo {
        /// Where the balancer listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// How many demo backends to start.
        #[arg(long, default_value_t = 3)]
        backends: usize,
    },
    /// Run a demo backend server (for demos, tests and benchmarks).
    Backend {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long)]
        listen: SocketAddr,
        /// Name reported in the X-Backend header (default: the listen address).
        #[arg(long)]
        name: Option<String>,
        /// Delay every answer by this many milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Worker threads.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Serve HTTPS (ALPN h2 and http/1.1) with this PEM certificate chain (needs --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<ExitCode> {
    let cli_format = cli.log_format.map(|f| match f {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    });
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => {
                eprintln!("{error}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("{error}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            init_logging(cli_format.unwrap_or(config.server.log_format));
            runtime(config.server.workers)?.block_on(run_until_signal(config, Some(&path)))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { listen, backends } => {
            init_logging(cli_format.unwrap_or_default());
            runtime(0)?.block_on(async move {
                let config = fulcrum::demo::start_demo_backends(listen, backends).await?;
                run_until_signal(config, None).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backend {
            listen,
            name,
            delay_ms,
            workers,
            tls_cert,
            tls_key,
        } => {
            init_logging(cli_format.unwrap_or_default());
            runtime(workers.max(1))?.block_on(async move {
                let options = BackendOptions {
                    name: name.clone(),
                    delay: Duration::from_millis(delay_ms),
                    tls: tls_cert.zip(tls_key),
                };
                let scheme = if options.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                let address = spawn_backend(listen, options).await?;
                println!(
                    "listening backend {scheme}://{address} name={}",
                    name.unwrap_or_else(|| address.to_string())
                );
                wait_for_signal().await;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A multi-threaded runtime with `workers` threads (0 = one per core).
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn run_until_signal(config: Config, path: Option<&Path>) -> Result<()> {
    let admin = config.admin.clone();
    let server = Server::start(config, path.map(Path::to_path_buf)).await?;
    let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
    let admin_address = fulcrum::admin::start(
        admin.listen.get_ref().0,
        admin.token,
        server.clone(),
        admin_stopped,
    )
    .await?;
    for listener in server.listeners().await {
        println!(
            "listening {} {}://{} pool={}",
            listener.name,
            if listener.tls { "https" } else { "http" },
            listener.address,
            listener.pool
        );
    }
    println!("listening admin http://{admin_address}");
    if path.is_none() {
        if let Some(first) = server.listeners().await.first() {
            println!("try: curl -i http://{}/", first.address);
            println!("press Ctrl-C to stop");
        }
    }
    tokio::spawn(reload_on_sighup(server.clone()));
    wait_for_signal().await;
    server.shutdown().await;
    let _ = stop_admin.send(true);
    Ok(())
}

/// Reloads the configuration on every SIGHUP; a bad file is logged and changes nothing.
async fn reload_on_sighup(server: std::sync::Arc<Server>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading configuration");
            let _ = server.reload().await;
        }
    }
    #[cfg(not(unix))]
    let _ = server;
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = match signal(SignalKind::terminate()) {
            Ok(terminate) => terminate,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
