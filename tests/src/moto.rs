//! AWS resources on the moto server started by `scripts/test.sh` (endpoint in
//! `FLEET_TEST_AWS_ENDPOINT`, always a loopback address). Each call creates fresh, uniquely
//! named resources, so tests can run in parallel against one server.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType,
};
use fleet_shared::adapters::aws::certs::{EXPIRY_INDEX, KIND_INDEX};
use fleet_shared::adapters::aws::devices::{ROTATION_DUE_INDEX, ROTATION_QUEUE};
use fleet_shared::adapters::aws::twins::{DRIFT_INDEX, FW_INDEX};
use fleet_shared::adapters::aws::{
    CampaignsTable, CertificatesTable, CommandsTable, DevicesTable, HealthTable, IotJobs, PresenceTables,
    S3Archive, TimestreamQuery, TimestreamSink, TwinsTable,
};
use fleet_shared::Env;

use crate::contract::Ports;

/// The resources the template declares, by name.
#[derive(Debug, Clone)]
pub struct AwsResources {
    pub devices_table: String,
    pub twins_table: String,
    pub certificates_table: String,
    pub health_table: String,
    pub commands_table: String,
    pub campaigns_table: String,
    pub telemetry_database: String,
    pub telemetry_table: String,
    pub archive_bucket: String,
}

impl AwsResources {
    /// The variables the template gives a function for these resources.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FLEET_STAGE", "test".to_owned()),
            ("FLEET_HOT_STORE", "timestream".to_owned()),
            ("FLEET_DEVICES_TABLE", self.devices_table.clone()),
            ("FLEET_TWINS_TABLE", self.twins_table.clone()),
            ("FLEET_CERTIFICATES_TABLE", self.certificates_table.clone()),
            ("FLEET_HEALTH_TABLE", self.health_table.clone()),
            ("FLEET_COMMANDS_TABLE", self.commands_table.clone()),
            ("FLEET_CAMPAIGNS_TABLE", self.campaigns_table.clone()),
            ("FLEET_THING_ARN_PREFIX", thing_arn_prefix()),
            ("FLEET_TELEMETRY_DB", self.telemetry_database.clone()),
            ("FLEET_TELEMETRY_TABLE", self.telemetry_table.clone()),
            ("FLEET_ARCHIVE_BUCKET", self.archive_bucket.clone()),
        ]
    }

    pub fn env(&self) -> Env {
        let vars = self.vars();
        Env::from_fn(move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
    }
}

/// Every AWS adapter on one set of fresh resources.
pub struct AwsAdapters {
    pub resources: AwsResources,
    pub devices: DevicesTable,
    pub twins: TwinsTable,
    pub certs: CertificatesTable,
    pub health: HealthTable,
    pub commands: CommandsTable,
    pub campaigns: CampaignsTable,
    /// IoT Jobs in moto's one registry (shared by every test: job ids must be unique).
    pub jobs: IotJobs,
    pub sink: TimestreamSink,
    pub query: TimestreamQuery,
    pub archive: S3Archive,
}

pub const ENDPOINT_VAR: &str = "FLEET_TEST_AWS_ENDPOINT";
/// The region the tests' clients use.
pub const REGION: &str = "us-east-1";
/// The account moto answers as.
pub const ACCOUNT: &str = "123456789012";

/// The ARNs of moto's things up to the name, as the template sets `FLEET_THING_ARN_PREFIX`.
pub fn thing_arn_prefix() -> String {
    format!("arn:aws:iot:{REGION}:{ACCOUNT}:thing/")
}

/// The moto endpoint, refusing anything but loopback.
pub fn endpoint() -> Result<String> {
    let url = std::env::var(ENDPOINT_VAR).with_context(|| {
        format!("{ENDPOINT_VAR} is not set: run the tests with scripts/test.sh, which starts moto")
    })?;
    let loopback = ["http://127.", "http://localhost:", "http://[::1]:"];
    if !loopback.iter().any(|p| url.starts_with(p)) {
        bail!("{ENDPOINT_VAR}={url} is not a loopback address");
    }
    Ok(url)
}

pub async fn sdk_config() -> Result<SdkConfig> {
    let creds = aws_sdk_dynamodb::config::Credentials::new("testing", "testing", None, None, "moto");
    Ok(aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint()?)
        .region(Region::new(REGION))
        .credentials_provider(creds)
        .load()
        .await)
}

/// A name no other test (or run against the same moto) uses: `<prefix>-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Fresh, uniquely named resources (created on moto).
pub async fn fresh_resources() -> Result<AwsResources> {
    let resources = AwsResources {
        devices_table: unique("devices"),
        twins_table: unique("twins"),
        certificates_table: unique("certificates"),
        health_table: unique("health"),
        commands_table: unique("commands"),
        campaigns_table: unique("campaigns"),
        telemetry_database: unique("fleet"),
        telemetry_table: "telemetry".into(),
        archive_bucket: unique("archive"),
    };
    create_resources(&sdk_config().await?, &resources).await?;
    Ok(resources)
}

/// Create a Devices table, a Timestream database + table and a bucket, and every adapter on
/// them, built as a function builds them (`from_env` with the template's variables).
pub async fn fresh_adapters() -> Result<AwsAdapters> {
    let resources = fresh_resources().await?;
    let sdk = sdk_config().await?;
    let env = resources.env();
    Ok(AwsAdapters {
        devices: DevicesTable::from_env(&sdk, &env)?,
        twins: TwinsTable::from_env(&sdk, &env)?,
        certs: CertificatesTable::from_env(&sdk, &env)?,
        health: HealthTable::from_env(&sdk, &env)?,
        commands: CommandsTable::from_env(&sdk, &env)?,
        campaigns: CampaignsTable::from_env(&sdk, &env)?,
        jobs: IotJobs::from_env(&sdk, &env)?,
        sink: TimestreamSink::from_env(&sdk, &env).await?,
        query: TimestreamQuery::from_env(&sdk, &env)?,
        archive: S3Archive::from_env(&sdk, &env)?,
        resources,
    })
}

/// The contract's ports on fresh moto resources.
pub async fn fresh_ports() -> Result<
    Ports<
        DevicesTable,
        TimestreamSink,
        S3Archive,
        TwinsTable,
        CertificatesTable,
        PresenceTables,
        HealthTable,
        CommandsTable,
    >,
> {
    let a = fresh_adapters().await?;
    Ok(Ports {
        presence: PresenceTables { devices: a.devices.clone(), health: a.health.clone() },
        health: a.health,
        commands: a.commands,
        devices: a.devices,
        sink: a.sink,
        archive: a.archive,
        twins: a.twins,
        certs: a.certs,
    })
}

/// A Campaigns table of its own (and nothing else), as a function builds the adapter.
pub async fn fresh_campaigns() -> Result<CampaignsTable> {
    let sdk = sdk_config().await?;
    let table = unique("campaigns");
    create_campaigns_table(&sdk, &table).await?;
    Ok(CampaignsTable::from_env(&sdk, &Env::from_pairs(&[("FLEET_CAMPAIGNS_TABLE", &table)]))?)
}

/// IoT Jobs on moto, as a function builds the adapter.
pub async fn fresh_jobs() -> Result<IotJobs> {
    let env = Env::from_pairs(&[("FLEET_THING_ARN_PREFIX", &thing_arn_prefix())]);
    Ok(IotJobs::from_env(&sdk_config().await?, &env)?)
}

/// The same resources `infra/template.yaml` declares (keys, Timestream table).
pub async fn create_resources(config: &SdkConfig, r: &AwsResources) -> Result<()> {
    let attr = |name: &str| {
        AttributeDefinition::builder().attribute_name(name).attribute_type(ScalarAttributeType::S).build()
    };
    let key = |name: &str, kind| KeySchemaElement::builder().attribute_name(name).key_type(kind).build();
    let rotation_due = GlobalSecondaryIndex::builder()
        .index_name(ROTATION_DUE_INDEX)
        .key_schema(key(ROTATION_QUEUE, KeyType::Hash)?)
        .key_schema(key("thing", KeyType::Range)?)
        .projection(
            Projection::builder().projection_type(ProjectionType::Include).non_key_attributes("mark").build(),
        )
        .build()?;
    aws_sdk_dynamodb::Client::new(config)
        .create_table()
        .table_name(&r.devices_table)
        .attribute_definitions(attr("thing")?)
        .attribute_definitions(attr("item")?)
        .attribute_definitions(attr(ROTATION_QUEUE)?)
        .key_schema(key("thing", KeyType::Hash)?)
        .key_schema(key("item", KeyType::Range)?)
        .global_secondary_indexes(rotation_due)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .context("create devices table")?;
    let number = |name: &str| {
        AttributeDefinition::builder().attribute_name(name).attribute_type(ScalarAttributeType::N).build()
    };
    let drift_index = GlobalSecondaryIndex::builder()
        .index_name(DRIFT_INDEX)
        .key_schema(key("drift_shard", KeyType::Hash)?)
        .key_schema(key("drift_since_ms", KeyType::Range)?)
        .projection(Projection::builder().projection_type(ProjectionType::All).build())
        .build()?;
    let fw_index = GlobalSecondaryIndex::builder()
        .index_name(FW_INDEX)
        .key_schema(key("reported_fw", KeyType::Hash)?)
        .key_schema(key("thing", KeyType::Range)?)
        .projection(Projection::builder().projection_type(ProjectionType::All).build())
        .build()?;
    aws_sdk_dynamodb::Client::new(config)
        .create_table()
        .table_name(&r.twins_table)
        .attribute_definitions(attr("thing")?)
        .attribute_definitions(attr("shadow")?)
        .attribute_definitions(attr("drift_shard")?)
        .attribute_definitions(number("drift_since_ms")?)
        .attribute_definitions(attr("reported_fw")?)
        .key_schema(key("thing", KeyType::Hash)?)
        .key_schema(key("shadow", KeyType::Range)?)
        .global_secondary_indexes(drift_index)
        .global_secondary_indexes(fw_index)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .context("create twins table")?;
    let index = |name: &str, hash: &str, range: &str| -> Result<GlobalSecondaryIndex> {
        Ok(GlobalSecondaryIndex::builder()
            .index_name(name)
            .key_schema(key(hash, KeyType::Hash)?)
            .key_schema(key(range, KeyType::Range)?)
            .projection(Projection::builder().projection_type(ProjectionType::All).build())
            .build()?)
    };
    aws_sdk_dynamodb::Client::new(config)
        .create_table()
        .table_name(&r.certificates_table)
        .attribute_definitions(attr("pk")?)
        .attribute_definitions(attr("sk")?)
        .attribute_definitions(attr("exp_bucket")?)
        .attribute_definitions(number("not_after_ms")?)
        .attribute_definitions(attr("kind")?)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .global_secondary_indexes(index(EXPIRY_INDEX, "exp_bucket", "not_after_ms")?)
        .global_secondary_indexes(index(KIND_INDEX, "kind", "pk")?)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .context("create certificates table")?;
    aws_sdk_dynamodb::Client::new(config)
        .create_table()
        .table_name(&r.health_table)
        .attribute_definitions(attr("pk")?)
        .attribute_definitions(attr("sk")?)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .context("create health table")?;
    let by_thing = GlobalSecondaryIndex::builder()
        .index_name(fleet_shared::adapters::aws::commands::BY_THING_INDEX)
        .key_schema(key("thing", KeyType::Hash)?)
        .key_schema(key("seq", KeyType::Range)?)
        .projection(Projection::builder().projection_type(ProjectionType::All).build())
        .build()?;
    aws_sdk_dynamodb::Client::new(config)
        .create_table()
        .table_name(&r.commands_table)
        .attribute_definitions(attr("cmd_id")?)
        .attribute_definitions(attr("thing")?)
        .attribute_definitions(number("seq")?)
        .key_schema(key("cmd_id", KeyType::Hash)?)
        .global_secondary_indexes(by_thing)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .context("create commands table")?;
    create_campaigns_table(config, &r.campaigns_table).await?;
    let ts = aws_sdk_timestreamwrite::Client::new(config);
    ts.create_database().database_name(&r.telemetry_database).send().await.context("create timestream db")?;
    ts.create_table()
        .database_name(&r.telemetry_database)
        .table_name(&r.telemetry_table)
        .send()
        .await
        .context("create timestream table")?;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(config).force_path_style(true).build(),
    );
    s3.create_bucket().bucket(&r.archive_bucket).send().await.context("create bucket")?;
    Ok(())
}

/// The Campaigns table: one item per campaign, keyed by `id`.
async fn create_campaigns_table(config: &SdkConfig, table: &str) -> Result<()> {
    aws_sdk_dynamodb::Client::new(config)
        .create_table()
        .table_name(table)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .key_schema(KeySchemaElement::builder().attribute_name("id").key_type(KeyType::Hash).build()?)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .context("create campaigns table")?;
    Ok(())
}
