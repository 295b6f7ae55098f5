//! Certificate marks on DynamoDB (moto): a rotation's stage reads the marks due from the sparse
//! index `by_rotation_due`; marks written before the index existed (no `rotation_queue`) are
//! still found, by a Scan, while the index holds none, so a deploy cannot make a running
//! rotation find nobody due.

use anyhow::Result;
use aws_sdk_dynamodb::types::AttributeValue;
use fleet_shared::adapters::aws::DevicesTable;
use fleet_shared::certs::expiry::ExpiryClass;
use fleet_shared::model::{CertificateId, ThingName};
use fleet_shared::ports::{CertMark, CertMarks, DeviceCertStatus};
use fleet_shared::Env;
use fleet_tests::moto;

fn mark(certificate: &str) -> CertMark {
    CertMark {
        certificate: CertificateId::of_der(certificate.as_bytes()),
        class: ExpiryClass::Warning,
        not_after_ms: 1_800_000_000_000,
        rotation_due: true,
        checked_ms: 1_764_000_000_000,
    }
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn marks_written_before_the_index_are_found_until_the_index_holds_any() -> Result<()> {
    let r = moto::fresh_resources().await?;
    let sdk = moto::sdk_config().await?;
    let devices =
        DevicesTable::from_env(&sdk, &Env::from_pairs(&[("FLEET_DEVICES_TABLE", &r.devices_table)]))?;
    // GIVEN a mark due as the daily check wrote it before the index existed
    let legacy = ThingName::parse("legacy-001")?;
    aws_sdk_dynamodb::Client::new(&sdk)
        .put_item()
        .table_name(&r.devices_table)
        .item("thing", AttributeValue::S(legacy.to_string()))
        .item("item", AttributeValue::S("cert".into()))
        .item("mark", AttributeValue::S(serde_json::to_string(&mark("old"))?))
        .item("cert_status", AttributeValue::S("warning".into()))
        .item("rotation_due", AttributeValue::Bool(true))
        .send()
        .await?;
    // WHEN a rotation asks who is due: THEN the index holds nobody, and the Scan finds it
    assert_eq!(devices.rotation_due().await?, [(legacy.clone(), mark("old"))]);
    // WHEN the daily check marks devices again (each mark it writes enters the index)
    let fresh = ThingName::parse("fresh-001")?;
    devices.mark_cert_status(&[(fresh.clone(), mark("new"))]).await?;
    // THEN the index answers, without a Scan: the marks it holds
    assert_eq!(devices.rotation_due().await?, [(fresh, mark("new"))]);
    Ok(())
}
