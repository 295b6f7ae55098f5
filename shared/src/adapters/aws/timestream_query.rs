//! Reading telemetry back with Timestream's query API: operators only (fleetctl), so the
//! deployed functions do not link the query client (cargo feature `operator`).

use aws_config::SdkConfig;

use super::timestream::MEASURE_NAME;
use super::{classify, endpoint_overridden};
use crate::env::{ConfigError, Env};
use crate::error::StoreError;
use crate::model::{MessageId, Metric, Reading, ReadingFlags, StoredReading, ThingName};
use crate::ports::TelemetryQuery;
use crate::time::parse_timestream_time;

/// Query results page size is Timestream's; this bounds how many pages one call reads.
const MAX_QUERY_PAGES: usize = 100;

/// Reading telemetry back with Timestream's query API. The client (and its endpoint
/// discovery) is built on first use: only operators query.
#[derive(Debug)]
pub struct TimestreamQuery {
    client: tokio::sync::OnceCell<aws_sdk_timestreamquery::Client>,
    sdk: Option<SdkConfig>,
    database: String,
    table: String,
}

impl TimestreamQuery {
    /// Reads `FLEET_TELEMETRY_DB` and `FLEET_TELEMETRY_TABLE`.
    pub fn from_env(sdk: &SdkConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            client: tokio::sync::OnceCell::new(),
            sdk: Some(sdk.clone()),
            database: env.required("FLEET_TELEMETRY_DB")?,
            table: env.required("FLEET_TELEMETRY_TABLE")?,
        })
    }

    /// From a ready client (tests inject mocked clients here).
    pub fn new(
        client: aws_sdk_timestreamquery::Client,
        database: impl Into<String>,
        table: impl Into<String>,
    ) -> Self {
        Self {
            client: tokio::sync::OnceCell::new_with(Some(client)),
            sdk: None,
            database: database.into(),
            table: table.into(),
        }
    }

    async fn query_client(&self) -> Result<&aws_sdk_timestreamquery::Client, StoreError> {
        self.client
            .get_or_try_init(|| async {
                let sdk = self
                    .sdk
                    .as_ref()
                    .ok_or_else(|| StoreError::permanent("timestream query", "no client configured"))?;
                let client = aws_sdk_timestreamquery::Client::new(sdk);
                if endpoint_overridden(sdk, "AWS_ENDPOINT_URL_TIMESTREAM_QUERY") {
                    return Ok(client);
                }
                let (client, reload) = client
                    .with_endpoint_discovery_enabled()
                    .await
                    .map_err(|e| StoreError::transient("timestream-query endpoint discovery", e))?;
                tokio::spawn(reload.reload_task());
                Ok(client)
            })
            .await
    }
}

/// Columns the adapter writes itself; every other non-null measure is a device metric.
const OWN_COLUMNS: [&str; 15] = [
    "thing",
    "class",
    "region",
    "fw",
    "test",
    "measure_name",
    "time",
    "bat",
    "up_s",
    "boot",
    "seq",
    "rx_ms",
    "schema",
    "skew",
    "device_ms",
];

/// One query result row (column name → scalar) back to a reading.
pub(crate) fn reading_from_row(columns: &[(String, Option<String>)]) -> Option<StoredReading> {
    let get = |name: &str| columns.iter().find(|(c, _)| c == name).and_then(|(_, v)| v.as_deref());
    let time_ms = parse_timestream_time(get("time")?)?;
    let rx_ms = get("rx_ms").and_then(|v| v.parse().ok()).unwrap_or(time_ms);
    let skew_corrected = get("skew") == Some("true");
    Some(StoredReading {
        reading: Reading {
            id: MessageId {
                thing: ThingName::parse(get("thing")?).ok()?,
                boot: get("boot")?.parse().ok()?,
                seq: get("seq")?.parse().ok()?,
            },
            time_ms,
            device_time_ms: get("device_ms").and_then(|v| v.parse().ok()).unwrap_or(time_ms),
            rx_ms,
            fw: get("fw").map(str::to_owned),
            metrics: columns
                .iter()
                .filter(|(c, _)| !OWN_COLUMNS.contains(&c.as_str()))
                .filter_map(|(c, v)| Some(Metric { name: c.clone(), value: v.as_deref()?.parse().ok()? }))
                .collect(),
            battery_pct: get("bat").and_then(|v| v.parse().ok()),
            uptime_s: get("up_s").and_then(|v| v.parse().ok()),
            test: get("test") == Some("true"),
            flags: ReadingFlags { skew_corrected, late: false },
            schema_version: get("schema").and_then(|v| v.parse().ok()).unwrap_or(1),
        },
        class: get("class").unwrap_or(crate::model::UNREGISTERED_CLASS).to_owned(),
        region: get("region").map(str::to_owned),
        // The record version is not queryable; readers do not need it.
        enrichment_version: 1,
    })
}

impl TelemetryQuery for TimestreamQuery {
    async fn telemetry(
        &self,
        thing: &ThingName,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<StoredReading>, StoreError> {
        // ThingName admits only [a-zA-Z0-9:_-]: safe to quote into SQL.
        let sql = format!(
            "SELECT * FROM \"{}\".\"{}\" WHERE thing = '{}' AND measure_name = '{MEASURE_NAME}' \
             AND time >= from_milliseconds({since_ms}) ORDER BY time ASC LIMIT {limit}",
            self.database,
            self.table,
            thing.as_str()
        );
        let mut out = Vec::new();
        let client = self.query_client().await?;
        let mut token: Option<String> = None;
        for _ in 0..MAX_QUERY_PAGES {
            let page = client
                .query()
                .query_string(&sql)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| classify("timestream query", e))?;
            let names: Vec<String> =
                page.column_info().iter().map(|c| c.name().unwrap_or_default().to_owned()).collect();
            for row in page.rows() {
                let columns: Vec<(String, Option<String>)> = names
                    .iter()
                    .cloned()
                    .zip(row.data().iter().map(|d| d.scalar_value().map(str::to_owned)))
                    .collect();
                out.extend(reading_from_row(&columns));
            }
            match page.next_token() {
                Some(t) if out.len() < limit => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_query_row_back_into_a_reading() {
        let col = |n: &str, v: Option<&str>| (n.to_owned(), v.map(str::to_owned));
        let row = vec![
            col("thing", Some("sensor-001")),
            col("class", Some("env")),
            col("region", None),
            col("fw", Some("1.4.2")),
            col("test", Some("false")),
            col("measure_name", Some("telemetry")),
            col("time", Some("2025-11-24 16:00:00.123001042")),
            col("temp_c", Some("21.5")),
            col("co2_ppm", None),
            col("boot", Some("7")),
            col("seq", Some("1042")),
            col("rx_ms", Some("1764000000200")),
            col("bat", Some("87.0")),
        ];
        let r = reading_from_row(&row).expect("row parses");
        assert_eq!(r.reading.time_ms, 1_764_000_000_123);
        assert_eq!(r.reading.id.seq, 1042);
        assert_eq!(r.reading.metrics, vec![Metric { name: "temp_c".into(), value: 21.5 }]);
        assert_eq!(r.region, None);
        assert_eq!(r.reading.battery_pct, Some(87.0));
    }
}
