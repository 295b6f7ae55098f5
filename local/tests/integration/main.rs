//! The local IoT Core's integration tests, one binary (one link instead of six).

mod commands;
mod iot_core;
mod jobs;
mod ota_device;
mod ota_page;
mod provisioning;
mod rotation_campaign;
mod slo_page;
mod support;
