//! The flowgate binary: parse the command line, set up logging, call the
//! library, map failures to exit codes (64 for a bad config).

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use flowgate::app::App;
use flowgate::cli::{Cli, Command, RunArgs};
use flowgate::config::{self, Config, ConfigError};

const EXIT_CONFIG: u8 = 64;

/// Default log filter. The embedded broker (rumqttd) logs routine disconnects
/// as errors, so it is silent unless asked for (`RUST_LOG=info,rumqttd=info`).
const DEFAULT_LOG: &str = "info,rumqttd=off";

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command.unwrap_or(Command::Run(RunArgs::default())) {
        Command::Check { config } => check(&config),
        Command::Run(args) => run(args),
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn load(args: &RunArgs) -> Result<Config, ConfigError> {
    match &args.config {
        Some(path) => Config::load(path),
        None if Path::new(config::DEFAULT_PATH).exists() => {
            Config::load(Path::new(config::DEFAULT_PATH))
        }
        None => Config::parse("", "built-in defaults"),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let app = match App::start(config).await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let http: Vec<String> = app
            .http_addrs
            .iter()
            .map(|(_, bound)| bound.to_string())
            .collect();
        let ready = serde_json::json!({
            "mqtt": app.mqtt_addr.to_string(),
            "admin": app.admin_addr.to_string(),
            "http": http,
        });
        println!("{ready}");
        if let Some(path) = &args.ready_file {
            if let Err(e) = std::fs::write(path, format!("{ready}\n")) {
                eprintln!("error: cannot write ready file {}: {e}", path.display());
            }
        }
        wait_for_signal().await;
        tracing::info!(grace = ?args.grace, "shutting down");
        app.shutdown(args.grace).await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops flowgate");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
