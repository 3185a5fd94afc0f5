//! End-to-end tests: each starts the real `fleetgate` binary on port 0 and drives it over
//! real sockets.

mod abuse;
mod admin;
mod alerts;
mod app;
mod audit;
mod auth;
mod chart;
mod cluster;
mod commands;
mod consumer;
mod ingest;
mod ingress;
mod interop;
mod jobs;
mod lifecycle;
mod limits;
mod loadtest;
mod mqtt;
mod mqtt_devices;
mod openapi;
mod rbac;
mod sdk;
mod secrets;
mod shadow;
mod signing;
mod support;
mod tls;
mod tokens;
mod tracing;
