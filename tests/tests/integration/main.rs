//! The workspace's integration tests, one binary (each test binary links the whole AWS SDK:
//! one binary instead of eleven keeps the build's disk and link time down). `aws_from_env` stays
//! apart: it sets process environment variables.

mod contract_aws;
mod contract_embedded;
mod iot_registry_moto;
mod ledger_aws;
mod load_moto;
mod ota_aws;
mod pipeline_aws;
mod replay;
mod rotation_marks_aws;
mod shadows_moto;
mod slo_template;
mod template;
mod twin_sync_aws;
