//! The request target of issue 8 on the real handler against moto: SQS batches of 1,000
//! messages from 100 devices take at most 25 AWS requests per 1,000 messages, with Timestream
//! as the hot store (the most requests) and without. CPU is measured only in the bench
//! (`scripts/bench-moto.sh`), never in a test.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use fleet_tests::load::{ingest_on_moto, runtime, Load};

const BATCHES: usize = 3;

fn per_batch(requests: &BTreeMap<String, usize>) -> BTreeMap<&str, usize> {
    requests.iter().map(|(op, n)| (op.as_str(), n / BATCHES)).collect()
}

#[test]
#[ignore = "needs the moto server started by scripts/test.sh"]
fn a_batch_of_1000_messages_from_100_devices_takes_at_most_25_requests() -> Result<()> {
    for timestream in [true, false] {
        // GIVEN 100 registered devices whose state items exist (one warm-up batch)
        let load = Load { devices: 100, messages_per_batch: 1_000, batches: BATCHES, timestream };
        // WHEN three more batches of 1,000 messages go through the handler
        let figures = ingest_on_moto(&runtime()?, load)?;
        // THEN each batch made: 1 enrichment read (100 state keys: the registrations were read
        // by the warm-up and are kept), 4 state writes (25 devices each), 1 archive object,
        // with Timestream 10 writes of 100 records, and one health counter update per bucket
        // the batch touched (its arrival minute; the minute and hour its devices' newest data
        // moved from): 1 to 3
        let mut requests = figures.requests.clone();
        let health = requests.remove("DynamoDB:UpdateItem").unwrap_or(0);
        ensure!((BATCHES..=3 * BATCHES).contains(&health), "{health} health updates in {BATCHES} batches");
        let mut expected = BTreeMap::from([
            ("DynamoDB:BatchGetItem", 1),
            ("DynamoDB:BatchExecuteStatement", 4),
            ("S3:PutObject", 1),
        ]);
        if timestream {
            expected.insert("Timestream Write:WriteRecords", 10);
        }
        ensure!(per_batch(&requests) == expected, "timestream={timestream}: {:?}", figures.requests);
        ensure!(
            figures.requests_per_1000_messages() <= 25.0,
            "{} requests per 1,000 messages",
            figures.requests_per_1000_messages()
        );
    }
    Ok(())
}
