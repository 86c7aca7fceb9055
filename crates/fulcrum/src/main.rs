//! The `fulcrum` command line: run, check, demo, backend, agent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use fulcrum::cli::demo_backend::{spawn_backend, spawn_tcp_echo, BackendOptions};
use fulcrum::config::{Config, LogFormat, RuntimeShape};
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
        /// Worker threads, replacing `[server] workers` (0 = one per CPU core).
        #[arg(long)]
        workers: Option<usize>,
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
        /// Start with one backend and let the autoscaler add backend processes under load
        /// (up to `--backends`, at least 4) and remove them when idle.
        #[arg(long)]
        autoscale: bool,
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
        /// Expect a PROXY protocol header (v1 or v2) on every connection and report the
        /// client address it carries (JSON `client`, header X-Client-Addr).
        #[arg(long)]
        proxy_protocol: bool,
        /// Be a raw TCP echo server instead of an HTTP server.
        #[arg(long)]
        tcp_echo: bool,
        /// Serve HTTPS (ALPN h2 and http/1.1) with this PEM certificate chain (needs --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Control a running balancer through its admin API (pools, backends, reload, events).
    Ctl(fulcrum::cli::ctl::CtlArgs),
    /// Run the backend agent: report this host's load in HAProxy's agent-check protocol
    /// (and as JSON on HTTP `GET /status`).
    Agent(fulcrum::cli::agent::AgentArgs),
}

/// mimalloc instead of the system allocator: see bench/RESULTS.md for the
/// measured difference in CPU per request and in idle-connection memory.
#[global_allocator]
static ALLOCATOR: fulcrum::runtime::allocator::MiMalloc = fulcrum::runtime::allocator::MiMalloc;

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
        Command::Ctl(args) => Ok(fulcrum::cli::ctl::main(args)),
        Command::Check { config } => match Config::load(&config) {
            Ok(loaded) => {
                if loaded.admin.needs_generated_token() {
                    eprintln!(
                        "note: [admin] listen {} is not loopback and has no token or token_file: `fulcrum run` will generate a token at start, print it once on stderr (\"admin token (generated, not saved): ...\") and require it",
                        loaded.admin.listen.get_ref().0
                    );
                }
                println!("{}: ok", config.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => {
                eprintln!("{error}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Run {
            config: path,
            workers,
        } => {
            let mut config = match Config::load(&path) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("{error}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            init_logging(cli_format.unwrap_or(config.server.log_format));
            raise_file_limit();
            if let Some(workers) = workers {
                config.server.workers = workers;
            }
            main_runtime(&config.server)?.block_on(run_until_signal(
                config,
                Some(&path),
                workers,
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            listen,
            backends,
            autoscale,
        } => {
            init_logging(cli_format.unwrap_or_default());
            main_runtime(&Default::default())?.block_on(async move {
                let config = if autoscale {
                    fulcrum::cli::demo::autoscaled_demo(listen, backends.max(4))?
                } else {
                    fulcrum::cli::demo::start_demo_backends(listen, backends).await?
                };
                run_until_signal(config, None, None).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backend {
            listen,
            name,
            delay_ms,
            workers,
            proxy_protocol,
            tcp_echo,
            tls_cert,
            tls_key,
        } => {
            init_logging(cli_format.unwrap_or_default());
            runtime(workers.max(1))?.block_on(async move {
                let stop = stop_signal();
                if tcp_echo {
                    let address = spawn_tcp_echo(listen, proxy_protocol).await?;
                    println!(
                        "listening backend tcp://{address} name={}",
                        name.unwrap_or_else(|| address.to_string())
                    );
                    stop.await;
                    return anyhow::Ok(());
                }
                let options = BackendOptions {
                    name: name.clone(),
                    delay: Duration::from_millis(delay_ms),
                    proxy_protocol,
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
                stop.await;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => {
            init_logging(cli_format.unwrap_or_default());
            runtime(1)?.block_on(async move {
                let stop = stop_signal();
                let addresses = fulcrum::cli::agent::start(&args).await?;
                println!("listening agent tcp://{}", addresses.agent);
                if let Some(http) = addresses.http {
                    println!("listening agent-http http://{http}");
                }
                stop.await;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The runtime `fulcrum run` starts on. With `runtime = "per_core"` (the default) it is a
/// single-threaded runtime: it serves the listeners itself when there is one worker, and
/// otherwise runs only the control plane while [`fulcrum::runtime::workers`] threads serve the
/// listeners. With `runtime = "work_stealing"` it is a multi-threaded runtime with one thread
/// per worker that does everything.
fn main_runtime(server: &fulcrum::config::ServerConfig) -> Result<tokio::runtime::Runtime> {
    match server.runtime {
        RuntimeShape::PerCore => runtime(1),
        RuntimeShape::WorkStealing => runtime(server.worker_count()),
    }
}

/// A runtime with `workers` threads (0 = one per core): single-threaded for one.
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    // One worker: a current-thread runtime (no work-stealing queues, no cross-thread wake-ups),
    // measured cheaper per request than a one-worker multi-threaded runtime.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if workers > 1 {
        builder.worker_threads(workers);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn run_until_signal(
    config: Config,
    path: Option<&Path>,
    workers_override: Option<usize>,
) -> Result<()> {
    let stop = stop_signal();
    let server = Server::start(config, path.map(Path::to_path_buf), workers_override).await?;
    reload_on_sighup(server.clone());
    let (stop_admin, admin_stopped) = tokio::sync::watch::channel(false);
    let admin_address = fulcrum::control::admin::start(server.clone(), admin_stopped).await?;
    for listener in server.listeners().await {
        println!(
            "listening {} {}://{} pool={}",
            listener.name,
            match (listener.tcp, listener.tls) {
                (true, _) => "tcp",
                (false, true) => "https",
                (false, false) => "http",
            },
            listener.address,
            listener.pool
        );
    }
    let admin_scheme = if server.admin_config().tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("listening admin {admin_scheme}://{admin_address}");
    if path.is_none() {
        if let Some(first) = server.listeners().await.first() {
            println!("try: curl -i http://{}/", first.address);
            println!("press Ctrl-C to stop");
        }
    }
    stop.await;
    server.shutdown().await;
    let _ = stop_admin.send(true);
    Ok(())
}

/// Installs the SIGHUP handler now (before readiness is printed) and reloads the
/// configuration on every SIGHUP; a bad file is logged and changes nothing.
fn reload_on_sighup(server: std::sync::Arc<Server>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot install the SIGHUP handler; reload through the admin API");
            return;
        };
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading configuration");
                let _ = server.reload().await;
            }
        });
    }
    #[cfg(not(unix))]
    let _ = server;
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
/// Installs the SIGINT/SIGTERM handlers now and returns a future that ends at the first of
/// them. Installed before readiness is printed, so a signal sent right after it is never
/// lost to the default action.
fn stop_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            return Box::pin(async move {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
            });
        }
    }
    Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// Raises the open file limit to the hard limit (the server warns, at start and at each
/// reload, when it cannot hold what the listeners' `max_connections` allow).
fn raise_file_limit() {
    match fulcrum::runtime::fdlimit::raise() {
        Ok(raised) if raised.now != raised.before => {
            tracing::info!(
                from = raised.before,
                to = raised.now,
                "open file limit raised"
            );
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
    }
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
