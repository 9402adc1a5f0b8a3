//! Command-line definitions (clap). Nothing here runs anything.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "flowgate",
    version,
    about = "Run one Node-RED instance as N replicas that share MQTT and HTTP work"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run flowgate (the default command).
    Run(RunArgs),
    /// Validate a config file: print it resolved, or every problem (exit 64).
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// The file is for flowgate inside Mosquitto (`flowgate-mosquitto`):
        /// keys only the proxy uses are refused.
        #[arg(long)]
        plugin: bool,
    },
    /// Exit 0 when a running flowgate is ready (GET /readyz answers 200), 1 if not:
    /// a container health check with no curl.
    Health {
        /// The admin listener of the flowgate to check.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
    },
    /// Show instances and replicas of a running flowgate, refreshed every second.
    Status(StatusArgs),
    /// Deploy a flows file to an instance's Node-RED replicas one at a time.
    Deploy(DeployArgs),
    /// Add a user to an MQTT password file (created if missing), or change its
    /// password; the password is read from the first line of stdin.
    Passwd {
        /// The password file (`mqtt.password_file` or an instance's).
        file: PathBuf,
        /// The username.
        user: String,
    },
    /// Drive a ramp of target rates at replicas and report what they achieved.
    Loadtest {
        #[command(subcommand)]
        kind: LoadtestKind,
    },
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The instance whose HTTP replicas (their Node-RED admin API) get the flows.
    #[arg(long)]
    pub instance: String,
    /// The flows file (a Node-RED flows.json).
    pub flows: PathBuf,
    /// The admin listener of the running flowgate.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    pub admin: String,
    /// How long each wait (drain, flows started) may take per replica.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub step_timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The admin listener of the flowgate to show.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    pub admin: String,
    /// Print one table (rates over one interval) and exit.
    #[arg(long)]
    pub once: bool,
    /// Time between readings.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

#[derive(Debug, Subcommand)]
pub enum LoadtestKind {
    /// GET a URL (through flowgate's HTTP listener) at the ramp's rates.
    Http {
        /// The URL to GET, http:// only.
        #[arg(long)]
        url: String,
        /// Response header naming the replica that answered.
        #[arg(long, default_value = "x-flowgate-replica")]
        replica_header: String,
        /// Requests in flight at most; later ones wait, and their wait counts as latency.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        #[command(flatten)]
        common: LoadtestCommon,
    },
    /// PUBLISH to a broker (or to flowgate) at the ramp's rates.
    Mqtt {
        /// host:port of the broker or of flowgate's MQTT listener.
        #[arg(long, default_value = "127.0.0.1:1883")]
        broker: String,
        /// Topic to publish on; `{seq}` is replaced by the message number.
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
        /// Payload size in bytes (a JSON object with `seq` and `ts`, padded).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Replicas answer here with `{"seq": N, "replica": "name"}`: latency is end to end.
        #[arg(long)]
        reply_topic: Option<String>,
        /// flowgate's admin URL: per-replica deliveries read from /api/instances.
        #[arg(long)]
        admin: Option<String>,
        /// The instance to read from --admin (default: the only one).
        #[arg(long)]
        instance: Option<String>,
        /// MQTT client id of the load generator [default: flowgate-loadtest-<pid>].
        #[arg(long)]
        client_id: Option<String>,
        #[command(flatten)]
        common: LoadtestCommon,
    },
}

#[derive(Debug, clap::Args)]
pub struct LoadtestCommon {
    /// Target rates per second, one per step: `5,10,20,40`.
    #[arg(long, default_value = "5,10,20,40")]
    pub ramp: String,
    /// How long each rate is held.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub step: Duration,
    /// An operation not finished this long after it was due is an error.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Write report.json and report.svg here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Config file [default: config/flowgate.toml when it exists, else built-in defaults]
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Write the bound listener addresses as JSON to this file once listening.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// How long to wait for connections to finish on SIGTERM/SIGINT.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// On SIGTERM, how long /readyz answers 503 while everything else still
    /// serves, before the listeners close (load balancers take flowgate out
    /// first; 0s: at once). Ctrl-C and a second signal skip it.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,
}

impl Default for RunArgs {
    /// `flowgate` with no subcommand: the same as `flowgate run`.
    fn default() -> Self {
        Self {
            config: None,
            ready_file: None,
            grace: Duration::from_secs(10),
            drain_delay: Duration::from_secs(5),
        }
    }
}
