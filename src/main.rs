//! The flowgate binary: parse the command line, set up logging, call the
//! library, map failures to exit codes (64 for a bad config).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use flowgate::admin::client;
use flowgate::app::App;
use flowgate::cli::{Cli, Command, DeployArgs, LoadtestKind, RunArgs, StatusArgs};
use flowgate::config::{self, Config, ConfigError};
use flowgate::loadtest::{self, http::HttpLoad, mqtt::MqttLoad, Progress, Ramp};
use flowgate::status::Reading;

const EXIT_CONFIG: u8 = 64;
/// Bad command-line values (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Default log filter. The embedded broker (rumqttd) logs routine disconnects
/// as errors, so it is silent unless asked for (`RUST_LOG=info,rumqttd=info`).
const DEFAULT_LOG: &str = "info,rumqttd=off";

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG.into()),
        )
        .with_writer(std::io::stderr)
        // colour only on a terminal: a log file or journald gets plain text
        // (NO_COLOR, the common convention, turns it off there too)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    match cli.command.unwrap_or(Command::Run(RunArgs::default())) {
        Command::Check { config, plugin } => check(&config, plugin),
        Command::Run(args) => run(args),
        Command::Status(args) => status(args),
        Command::Deploy(args) => deploy(args),
        Command::Health { admin } => health(&admin),
        Command::Loadtest { kind } => loadtest(kind),
        Command::Passwd { file, user } => passwd(&file, &user),
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// The multi-threaded runtime with `threads` workers (default: one per core,
/// or `TOKIO_WORKER_THREADS`).
fn runtime_with(threads: Option<usize>) -> Option<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    match builder.enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            None
        }
    }
}

fn status(args: StatusArgs) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let mut prev: Option<Reading> = None;
        loop {
            let doc = match client::instances(&args.admin).await {
                Ok(doc) => doc,
                Err(e) => {
                    eprintln!("error: {e}");
                    if args.once || prev.is_none() {
                        return ExitCode::FAILURE;
                    }
                    tokio::time::sleep(args.interval).await;
                    continue;
                }
            };
            let cur = Reading {
                at: std::time::Instant::now(),
                doc,
            };
            if args.once {
                if prev.is_none() {
                    prev = Some(cur);
                    tokio::time::sleep(args.interval).await;
                    continue;
                }
                print!(
                    "{}",
                    flowgate::status::render(&args.admin, prev.as_ref(), &cur)
                );
                return ExitCode::SUCCESS;
            }
            let table = flowgate::status::render(&args.admin, prev.as_ref(), &cur);
            // home the cursor and clear the screen, then draw
            print!("\x1b[H\x1b[2J{table}");
            let _ = std::io::stdout().flush();
            prev = Some(cur);
            tokio::select! {
                () = tokio::time::sleep(args.interval) => {}
                _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            }
        }
    })
}

/// `GET /readyz`: exit 0 on 200.
fn health(admin: &str) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    match rt.block_on(client::get(admin, "/readyz")) {
        Ok((200, _)) => {
            println!("ready");
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            eprintln!(
                "not ready: /readyz answered {code}: {}",
                String::from_utf8_lossy(&body).trim()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("not ready: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts a rolling deploy through the admin API and follows it to the end.
fn deploy(args: DeployArgs) -> ExitCode {
    let flows = match std::fs::read(&args.flows) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.flows.display());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let path = format!("/api/instances/{}/deploy", args.instance);
        let start = format!(
            "{path}?step_timeout={}",
            humantime::format_duration(args.step_timeout)
        );
        let started = client::admin_request(
            hyper::Method::POST,
            &args.admin,
            &start,
            &[("content-type", "application/json")],
            flows.into(),
        )
        .await;
        match started {
            Ok((202, _)) => {}
            Ok((code, body)) => {
                eprintln!(
                    "error: flowgate answered {code}: {}",
                    String::from_utf8_lossy(&body).trim()
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
        let mut shown = 0;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let status = match client::admin_get(&args.admin, &path).await {
                Ok((200, body)) => {
                    serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default()
                }
                Ok((code, _)) => {
                    eprintln!("error: deploy status answered {code}");
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let log = status["log"].as_array().cloned().unwrap_or_default();
            for line in log.iter().skip(shown) {
                println!("{}", line.as_str().unwrap_or_default());
            }
            shown = log.len();
            match status["state"].as_str() {
                Some("running") => {}
                Some("done") => return ExitCode::SUCCESS,
                _ => {
                    if let Some(dir) = status["backup_dir"].as_str() {
                        eprintln!("flows found before the deploy are saved in {dir}");
                    }
                    return ExitCode::FAILURE;
                }
            }
        }
    })
}

/// Progress on stderr: a bar redrawn in place on a terminal, one line per
/// step otherwise.
fn progress_printer() -> impl Fn(&Progress) + Sync {
    let tty = std::io::stderr().is_terminal();
    let last_step = AtomicUsize::new(usize::MAX);
    move |p: &Progress| {
        let done = p.elapsed.as_secs_f64() / p.total.as_secs_f64().max(1e-9);
        if tty {
            let width = 30;
            let filled = ((done * width as f64) as usize).min(width);
            eprint!(
                "\r\x1b[2K[{}{}] step {}/{}  target {:.1}/s  achieved {:.1}/s  errors {}  {:.0}/{:.0} s",
                "#".repeat(filled),
                ".".repeat(width - filled),
                p.step + 1,
                p.steps,
                p.target_rate,
                p.achieved_rate,
                p.errors,
                p.elapsed.as_secs_f64(),
                p.total.as_secs_f64()
            );
        } else if last_step.swap(p.step, Ordering::Relaxed) != p.step {
            eprintln!(
                "step {}/{}: target {:.1}/s ({:.0}/{:.0} s)",
                p.step + 1,
                p.steps,
                p.target_rate,
                p.elapsed.as_secs_f64(),
                p.total.as_secs_f64()
            );
        }
    }
}

fn loadtest(kind: LoadtestKind) -> ExitCode {
    let common = match &kind {
        LoadtestKind::Http { common, .. } | LoadtestKind::Mqtt { common, .. } => common,
    };
    let ramp = match Ramp::parse(&common.ramp, common.step) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let progress = progress_printer();
    let result = rt.block_on(async {
        match &kind {
            LoadtestKind::Http {
                url,
                replica_header,
                concurrency,
                common,
            } => {
                let url = url
                    .parse()
                    .map_err(|_| format!("--url {url:?} is not a URL"))?;
                let load = HttpLoad {
                    url,
                    concurrency: *concurrency,
                    timeout: common.timeout,
                    replica_header: replica_header.clone(),
                };
                loadtest::http::run(&load, &ramp, &progress)
                    .await
                    .map_err(|e| e.to_string())
            }
            LoadtestKind::Mqtt {
                broker,
                topic,
                qos,
                size,
                reply_topic,
                admin,
                instance,
                client_id,
                common,
            } => {
                let load = MqttLoad {
                    broker: broker.clone(),
                    topic: topic.clone(),
                    qos: *qos,
                    size: *size,
                    client_id: client_id
                        .clone()
                        .unwrap_or_else(|| format!("flowgate-loadtest-{}", std::process::id())),
                    reply_topic: reply_topic.clone(),
                    admin: admin.clone(),
                    instance: instance.clone(),
                    timeout: common.timeout,
                };
                loadtest::mqtt::run(&load, &ramp, &progress)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    });
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = &common.out {
        if let Err(e) = write_report(dir, &report) {
            eprintln!("error: cannot write the report to {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        eprintln!("wrote {0}/report.json and {0}/report.svg", dir.display());
    }
    if common.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.table());
    }
    ExitCode::SUCCESS
}

/// `report.json` and `report.svg` in `dir` (created).
fn write_report(dir: &Path, report: &loadtest::Report) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("report.json"), json)?;
    std::fs::write(dir.join("report.svg"), loadtest::chart::svg(report))
}

fn check(path: &Path, plugin: bool) -> ExitCode {
    let loaded = if plugin {
        Config::load_plugin(path)
    } else {
        Config::load(path)
    };
    let loaded = loaded.and_then(|c| with_files(c, path));
    match loaded {
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
        Some(path) => Config::load(path).and_then(|c| with_files(c, path)),
        None if Path::new(config::DEFAULT_PATH).exists() => {
            let path = Path::new(config::DEFAULT_PATH);
            Config::load(path).and_then(|c| with_files(c, path))
        }
        None => Config::parse_in("", "built-in defaults", Some(Path::new("."))),
    }
}

/// `config` once the files it names (TLS, passwords) have been read.
fn with_files(config: Config, path: &Path) -> Result<Config, ConfigError> {
    flowgate::app::check_files(&config, &path.display().to_string())?;
    Ok(config)
}

fn run(args: RunArgs) -> ExitCode {
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(runtime) = runtime_with(config.worker_threads) else {
        return ExitCode::FAILURE;
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
            "mqtts": app.mqtts_addr.map(|a| a.to_string()),
            "ws": app.ws_addr.map(|a| a.to_string()),
        });
        println!("{ready}");
        if let Some(path) = &args.ready_file {
            if let Err(e) = std::fs::write(path, format!("{ready}\n")) {
                eprintln!("error: cannot write ready file {}: {e}", path.display());
            }
        }
        if wait_for_signal(&app).await == Stop::Term && !args.drain_delay.is_zero() {
            // the Kubernetes preStop pattern: unready first, stop after
            app.unready();
            tracing::info!(drain_delay = ?args.drain_delay, "SIGTERM: /readyz answers 503, everything else still serves until the drain delay ends (a second signal stops at once)");
            tokio::select! {
                () = tokio::time::sleep(args.drain_delay) => {}
                _ = wait_for_signal(&app) => {}
            }
        }
        tracing::info!(grace = ?args.grace, "shutting down");
        app.shutdown(args.grace).await;
        ExitCode::SUCCESS
    })
}

/// `flowgate passwd FILE USER`: the password from stdin's first line.
fn passwd(file: &std::path::Path, user: &str) -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("error: cannot read the password from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!(
            "error: empty password (give it on stdin: echo 'secret' | flowgate passwd FILE USER)"
        );
        return ExitCode::FAILURE;
    }
    match flowgate::mqtt::auth::set_user(file, user, password.as_bytes()) {
        Ok(()) => {
            eprintln!(
                "{user} set in {}; send flowgate SIGHUP to reload",
                file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Waits for Ctrl-C or SIGTERM; each SIGHUP meanwhile reloads certificates
/// and password files.
/// The signal that stops flowgate.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: an orchestrator stops it (the drain delay applies).
    Term,
    /// Ctrl-C (SIGINT): someone at a terminal.
    Interrupt,
}

/// Waits for a stop signal; SIGHUP on the way reloads certificates and
/// password files.
async fn wait_for_signal(app: &App) -> Stop {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops flowgate");
                let _ = ctrl_c.await;
                return Stop::Interrupt;
            }
        };
        let mut hup = signal(SignalKind::hangup()).ok();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return Stop::Interrupt,
                _ = term.recv() => return Stop::Term,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading certificates and password files");
                    app.reload();
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        Stop::Interrupt
    }
}
