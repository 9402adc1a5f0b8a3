//! Command-line definitions (clap). Nothing here runs anything.

use std::path::PathBuf;

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
    },
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
    pub grace: std::time::Duration,
}

impl Default for RunArgs {
    /// `flowgate` with no subcommand: the same as `flowgate run`.
    fn default() -> Self {
        Self {
            config: None,
            ready_file: None,
            grace: std::time::Duration::from_secs(10),
        }
    }
}
