//! Integration tests: real Mosquitto, real rumqttc clients, flowgate on
//! loopback port 0. One binary so the support code is built once.

mod support;

mod admin;
mod binary;
mod bundled;
mod complete;
mod dispatch;
mod hostile;
mod http;
mod http_wire;
mod loadtest;
mod mqtt5;
mod nodered;
mod plugin;
mod security;
mod share_mode;
mod standby;
mod status;
