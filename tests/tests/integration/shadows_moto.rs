//! The iot-data shadow adapter (`IotDataShadows`, port `ShadowService`) on the moto server:
//! update, get, version conflicts, delete, named shadows, a thing moto does not know, an
//! operator write (`twin::write::set_desired`) that meets a concurrent write and retries, and
//! 50 operators writing one shadow at once.
//!
//! moto serves shadows only for things in its IoT registry, so each test first creates its
//! thing with IoT's CreateThing (`IotControlPlane`, signed for the `iot` service: moto routes a
//! request on one port by its credential scope).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use anyhow::{ensure, Context, Result};
use fleet_shared::adapters::aws::{IotControlPlane, IotDataShadows};
use fleet_shared::model::{ShadowName, ThingName};
use fleet_shared::ports::{ShadowCallError, ShadowService, ShadowState};
use fleet_shared::twin::write::{set_desired, WriteOutcome};
use fleet_shared::{Env, StoreError};
use fleet_tests::moto;
use serde_json::{json, Map, Value};

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn update_get_conflict_and_delete_through_iot_data() -> Result<()> {
    // GIVEN a registered thing without a shadow
    let (shadows, thing) = (adapter().await?, fresh_thing().await?);
    let classic = ShadowName::classic();
    ensure!(shadows.get_shadow(&thing, &classic).await?.is_none(), "a new thing has a shadow");

    // WHEN desired and reported are written
    let first = json!({"state": {"desired": {"fw": "2.1.0", "mode": "eco"},
                                 "reported": {"fw": "1.4.2", "mode": "eco"}}});
    let version = shadows.update_shadow(&thing, &classic, &first).await?;
    // THEN the shadow is at version 1 and reads back as written
    assert_eq!(version, 1);
    let got = shadows.get_shadow(&thing, &classic).await?.context("no shadow after update")?;
    assert_eq!(
        got,
        ShadowState {
            version: 1,
            desired: obj(json!({"fw": "2.1.0", "mode": "eco"})),
            reported: obj(json!({"fw": "1.4.2", "mode": "eco"})),
        }
    );

    // WHEN an update carries a version that is no longer the shadow's
    let stale = json!({"state": {"reported": {"fw": "2.1.0"}}, "version": 0});
    let refused = shadows.update_shadow(&thing, &classic, &stale).await;
    // THEN it is a conflict, and the shadow is unchanged
    assert!(matches!(refused, Err(ShadowCallError::Conflict)), "stale version: {refused:?}");
    let got = shadows.get_shadow(&thing, &classic).await?.context("shadow gone")?;
    assert_eq!((got.version, &got.reported["fw"]), (1, &json!("1.4.2")));
    // AND the current version is accepted, merging into what is there
    let current = json!({"state": {"reported": {"fw": "2.1.0"}}, "version": 1});
    assert_eq!(shadows.update_shadow(&thing, &classic, &current).await?, 2);
    let got = shadows.get_shadow(&thing, &classic).await?.context("shadow gone")?;
    assert_eq!(got.reported, obj(json!({"fw": "2.1.0", "mode": "eco"})));

    // WHEN the shadow is deleted
    let deleted = shadows.delete_shadow(&thing, &classic).await?;
    // THEN the delete names a version (moto answers the shadow's version + 1, see the report in
    // `delete_of_a_shadow_that_never_existed_is_none`), and the shadow is gone
    assert!(matches!(deleted, Some(v) if v >= 2), "delete: {deleted:?}");
    let after = shadows.get_shadow(&thing, &classic).await?;
    assert_eq!(after, None);
    Ok(())
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn a_named_shadow_is_separate_from_the_classic_one() -> Result<()> {
    // GIVEN a registered thing
    let (shadows, thing) = (adapter().await?, fresh_thing().await?);
    let (classic, config) = (ShadowName::classic(), ShadowName::parse("config")?);

    // WHEN only its named shadow "config" is written, twice
    let v1 =
        shadows.update_shadow(&thing, &config, &json!({"state": {"reported": {"interval_s": 60}}})).await?;
    let v2 =
        shadows.update_shadow(&thing, &config, &json!({"state": {"desired": {"interval_s": 30}}})).await?;

    // THEN the named shadow has its own versions and state
    assert_eq!((v1, v2), (1, 2));
    let got = shadows.get_shadow(&thing, &config).await?.context("no named shadow")?;
    assert_eq!(
        (got.version, got.desired, got.reported),
        (2, obj(json!({"interval_s": 30})), obj(json!({"interval_s": 60})))
    );
    // AND the classic shadow does not exist: neither read nor deleted
    assert_eq!(shadows.get_shadow(&thing, &classic).await?, None);
    assert_eq!(shadows.delete_shadow(&thing, &classic).await?, None);
    // AND deleting the named shadow removes only it
    assert!(shadows.delete_shadow(&thing, &config).await?.is_some());
    assert_eq!(shadows.get_shadow(&thing, &config).await?, None);
    Ok(())
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn delete_of_a_shadow_that_never_existed_is_none() -> Result<()> {
    // GIVEN a registered thing whose shadow was never written
    let (shadows, thing) = (adapter().await?, fresh_thing().await?);
    // WHEN it is deleted
    let deleted = shadows.delete_shadow(&thing, &ShadowName::classic()).await?;
    // THEN there was nothing to delete (404 → None)
    assert_eq!(deleted, None);
    // Not checked here: a second delete of a deleted shadow. AWS answers 404 (no shadow); moto
    // 5.2.5 answers 200 with version + 1 each time (its delete stores a tombstone that the next
    // delete finds), and its first delete answers the shadow's version + 1 rather than the
    // version deleted, so a recreated shadow skips a number.
    Ok(())
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn a_thing_that_does_not_exist_has_no_shadow() -> Result<()> {
    // GIVEN a thing name moto's registry does not hold
    let shadows = adapter().await?;
    let thing = ThingName::parse(&unique("never-created"))?;
    let classic = ShadowName::classic();
    // WHEN its shadow is read or deleted
    let got = shadows.get_shadow(&thing, &classic).await?;
    let deleted = shadows.delete_shadow(&thing, &classic).await?;
    // THEN there is none
    assert_eq!((got, deleted), (None, None));
    // AND an update is refused by moto as a permanent error (moto requires a registered thing and
    // answers ResourceNotFoundException, an error the iot-data model does not declare for
    // UpdateThingShadow; AWS creates the shadow). It must not read as a conflict or a retry.
    let update = shadows.update_shadow(&thing, &classic, &json!({"state": {"reported": {"x": 1}}})).await;
    assert!(
        matches!(&update, Err(ShadowCallError::Store(e)) if !e.is_transient()),
        "update of an unknown thing: {update:?}"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn set_desired_applies_and_after_a_concurrent_write_rereads_and_retries() -> Result<()> {
    // GIVEN a device that reported its firmware
    let (shadows, thing) = (adapter().await?, fresh_thing().await?);
    let classic = ShadowName::classic();
    shadows.update_shadow(&thing, &classic, &json!({"state": {"reported": {"fw": "1.4.2"}}})).await?;

    // WHEN an operator desires firmware 2.1.0
    let first = set_desired(&shadows, &thing, &classic, &obj(json!({"fw": "2.1.0"})), "op-1").await?;
    // THEN it is applied at once, at the next version
    assert_eq!(first, WriteOutcome::Applied { version: 2, attempts: 1 });

    // WHEN another operator's write lands between the next write's read and its update
    let raced =
        RacedBy { svc: &shadows, other: Mutex::new(Some(json!({"state": {"desired": {"mode": "eco"}}}))) };
    let second = set_desired(&raced, &thing, &classic, &obj(json!({"fw": "2.2.0"})), "op-2").await?;
    // THEN the first try meets a 409, the second (after reading again) is applied
    assert_eq!(second, WriteOutcome::Applied { version: 4, attempts: 2 });
    // AND neither write is lost, and reported is untouched
    let got = shadows.get_shadow(&thing, &classic).await?.context("shadow gone")?;
    assert_eq!(
        (got.version, got.desired, got.reported),
        (4, obj(json!({"fw": "2.2.0", "mode": "eco"})), obj(json!({"fw": "1.4.2"})))
    );

    // WHEN a key is desired as null
    let third = set_desired(&shadows, &thing, &classic, &obj(json!({"mode": null})), "op-3").await?;
    // THEN it is no longer desired
    assert_eq!(third, WriteOutcome::Applied { version: 5, attempts: 1 });
    let got = shadows.get_shadow(&thing, &classic).await?.context("shadow gone")?;
    assert_eq!(got.desired, obj(json!({"fw": "2.2.0"})));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the moto server started by scripts/test.sh"]
async fn fifty_concurrent_operator_writes_through_iot_data_are_each_applied_or_reported() -> Result<()> {
    // GIVEN one shadow on moto's iot-data (its version check and write made atomic, as AWS's,
    // by scripts/moto_server.py)
    let (shadows, thing) = (std::sync::Arc::new(adapter().await?), fresh_thing().await?);
    let classic = ShadowName::classic();
    shadows.update_shadow(&thing, &classic, &json!({"state": {"reported": {"fw": "1.4.2"}}})).await?;
    // WHEN 50 writers each set their own desired key at once
    let writers = (0..50).map(|i| {
        let (svc, thing, classic) = (std::sync::Arc::clone(&shadows), thing.clone(), classic.clone());
        tokio::spawn(async move {
            let patch = obj(json!({ format!("w{i}"): i }));
            (i, set_desired(&*svc, &thing, &classic, &patch, &format!("writer-{i}")).await)
        })
    });
    let mut applied = Vec::new();
    let mut gave_up = 0;
    for w in writers.collect::<Vec<_>>() {
        match w.await? {
            (i, Ok(WriteOutcome::Applied { version, .. })) => applied.push((i, version)),
            (_, Ok(WriteOutcome::GaveUp { .. })) => gave_up += 1,
            (i, other) => anyhow::bail!("writer {i}: {other:?}"),
        }
    }
    // THEN each is applied at a version of its own or reported as given up, and the final
    // document holds every applied write, one version each
    ensure!(applied.len() + gave_up == 50, "{} applied, {gave_up} gave up", applied.len());
    let mut versions: Vec<u64> = applied.iter().map(|(_, v)| *v).collect();
    versions.sort_unstable();
    versions.dedup();
    ensure!(versions.len() == applied.len(), "two writes reported the same version");
    let got = shadows.get_shadow(&thing, &classic).await?.context("shadow gone")?;
    for (i, _) in &applied {
        ensure!(got.desired.get(&format!("w{i}")) == Some(&Value::from(*i)), "applied write {i} lost");
    }
    ensure!(got.version == 1 + applied.len() as u64, "one version per applied write: {}", got.version);
    // Each writer retries a bounded number of times, so how many win depends on the machine's
    // speed (24 of 50 on a loaded 2-core machine): at least a fifth must.
    ensure!(applied.len() >= 10, "only {} of 50 applied", applied.len());
    Ok(())
}

/// The shadow service with one other write slipped in before the first update it sends, as a
/// concurrent operator's write would land between a read and a write.
struct RacedBy<'a> {
    svc: &'a IotDataShadows,
    other: Mutex<Option<Value>>,
}

impl ShadowService for RacedBy<'_> {
    async fn get_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
    ) -> Result<Option<ShadowState>, StoreError> {
        self.svc.get_shadow(thing, shadow).await
    }

    async fn update_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
        request: &Value,
    ) -> Result<u64, ShadowCallError> {
        let other = self.other.lock().ok().and_then(|mut o| o.take());
        if let Some(other) = other {
            self.svc.update_shadow(thing, shadow, &other).await?;
        }
        self.svc.update_shadow(thing, shadow, request).await
    }

    async fn delete_shadow(&self, thing: &ThingName, shadow: &ShadowName) -> Result<Option<u64>, StoreError> {
        self.svc.delete_shadow(thing, shadow).await
    }
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// The adapter as fleetctl builds it, on the moto endpoint.
async fn adapter() -> Result<IotDataShadows> {
    Ok(IotDataShadows::from_env(&moto::sdk_config().await?, &Env::from_fn(|_| None))?)
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A thing created in moto's IoT registry (CreateThing through the IoT control-plane adapter).
async fn fresh_thing() -> Result<ThingName> {
    let thing = ThingName::parse(&unique("shadow-thing"))?;
    IotControlPlane::new(&moto::sdk_config().await?)?.create_thing(&thing).await?;
    Ok(thing)
}
