//! fleetctl's integration tests, run against the built binary, in one test binary (one link
//! instead of six).

mod allowlist;
mod demo_ota;
mod firmware;
mod local_stack;
mod ota_campaign;
mod ota_gate;
mod shadow_mqtt;
mod support;
