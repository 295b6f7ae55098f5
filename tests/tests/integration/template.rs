//! What `infra/template.yaml` promises a first deploy into a new account: nothing left behind
//! when it fails, nothing whose name blocks the next attempt, and every alarm notifying someone.
//! (cfn-lint in scripts/test.sh checks the template against CloudFormation's schemas.)

use fleet_shared::adapters::aws::devices::{ROTATION_DUE_INDEX, ROTATION_QUEUE};
use serde_yaml_ng::{Mapping, Value};

fn resources() -> Mapping {
    let text = include_str!("../../../infra/template.yaml");
    let doc: Value = serde_yaml_ng::from_str(text).expect("the template parses");
    doc.get("Resources").and_then(Value::as_mapping).cloned().expect("Resources")
}

fn of_type<'a>(resources: &'a Mapping, ty: &'a str) -> impl Iterator<Item = (&'a str, &'a Value)> + 'a {
    resources
        .iter()
        .filter(move |(_, r)| r.get("Type").and_then(Value::as_str) == Some(ty))
        .filter_map(|(id, r)| Some((id.as_str()?, r)))
}

#[test]
fn a_failed_first_deploy_leaves_nothing_behind_and_a_retry_cannot_collide() {
    let resources = resources();
    let mut retained = 0;
    for (id, r) in &resources {
        let id = id.as_str().unwrap_or_default();
        if let Some(policy) = r.get("DeletionPolicy").and_then(Value::as_str) {
            assert_ne!(
                policy, "Retain",
                "{id}: Retain keeps it after a failed first deploy; use RetainExceptOnCreate"
            );
            retained += usize::from(policy == "RetainExceptOnCreate");
            // A kept store with a fixed name would block the next stack of the same stage.
            let props = r.get("Properties").and_then(Value::as_mapping).cloned().unwrap_or_default();
            for name in ["TableName", "DatabaseName", "BucketName"] {
                // A Timestream table's name is scoped by its (generated) database.
                let scoped = r.get("Type").and_then(Value::as_str) == Some("AWS::Timestream::Table");
                assert!(scoped || !props.contains_key(name), "{id}: a retained store with a fixed {name}");
            }
        }
    }
    assert!(retained >= 4, "the table, the Timestream database and table, and the bucket are kept on delete");
}

#[test]
fn every_alarm_notifies_and_says_when_it_is_ok_again() {
    let resources = resources();
    let alarms: Vec<_> = of_type(&resources, "AWS::CloudWatch::Alarm").collect();
    assert!(!alarms.is_empty());
    for (id, alarm) in alarms {
        let props = alarm.get("Properties").expect("Properties");
        for key in ["AlarmActions", "OKActions"] {
            let actions = props.get(key).and_then(Value::as_sequence);
            assert!(actions.is_some_and(|a| !a.is_empty()), "{id} has no {key}");
        }
    }
    // What a production owner expects to be told about.
    let watched: Vec<String> = of_type(&resources, "AWS::CloudWatch::Alarm")
        .filter_map(|(_, a)| a.get("Properties")?.get("MetricName")?.as_str().map(str::to_owned))
        .collect();
    for metric in [
        "Errors",
        "Throttles",
        "ApproximateAgeOfOldestMessage",
        "ApproximateNumberOfMessagesVisible",
        "TopicRuleErrors",
        "CampaignsRolledBack",
        "CampaignsHalted",
    ] {
        assert!(watched.iter().any(|m| m == metric), "no alarm on {metric}: {watched:?}");
    }
    let topic = resources.get("AlarmTopic").expect("a topic the stack creates when none is given");
    assert_eq!(topic.get("Condition").and_then(Value::as_str), Some("CreateAlarmTopic"));
}

#[test]
fn the_rule_role_trusts_only_this_rule_and_the_archive_lifecycle_stays_valid() {
    let text = include_str!("../../../infra/template.yaml");
    let doc: Value = serde_yaml_ng::from_str(text).expect("the template parses");
    let trust = &doc["Resources"]["TopicRuleRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0];
    assert!(trust["Condition"]["StringEquals"].get("aws:SourceAccount").is_some(), "{trust:?}");
    assert!(trust["Condition"]["ArnLike"].get("aws:SourceArn").is_some(), "{trust:?}");
    // Expiration must come after the last transition (90 days) or S3 refuses the rules.
    let min = doc["Parameters"]["RawArchiveRetentionDays"]["MinValue"].as_u64();
    assert!(min.is_some_and(|m| m > 90), "RawArchiveRetentionDays MinValue {min:?}");
}

// ------------------------------------------------------------------ both HotStore variants
//
// CloudFormation resolves Conditions, `Fn::If` and `AWS::NoValue` before anything is created.
// `render` does the same for the parts this template uses, so a test can look at exactly what
// `sam deploy` with given parameters would create, and check that nothing left in it refers to
// something that is not.

/// Short-form tags (`!Ref x`, `!GetAtt a.b`, `!If [...]`) as their long forms.
fn long_form(v: &Value) -> Value {
    match v {
        Value::Tagged(t) => {
            let tag = t.tag.to_string();
            let name = tag.trim_start_matches('!');
            let inner = long_form(&t.value);
            let inner = match (name, &inner) {
                ("GetAtt", Value::String(s)) => {
                    Value::Sequence(s.splitn(2, '.').map(|p| Value::String(p.to_owned())).collect())
                }
                _ => inner,
            };
            let key =
                if matches!(name, "Ref" | "Condition") { name.to_owned() } else { format!("Fn::{name}") };
            let mut m = Mapping::new();
            m.insert(Value::String(key), inner);
            Value::Mapping(m)
        }
        Value::Mapping(m) => Value::Mapping(m.iter().map(|(k, v)| (k.clone(), long_form(v))).collect()),
        Value::Sequence(s) => Value::Sequence(s.iter().map(long_form).collect()),
        other => other.clone(),
    }
}

fn single<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    let m = v.as_mapping()?;
    if m.len() == 1 {
        m.get(key)
    } else {
        None
    }
}

struct Rendered {
    resources: Mapping,
    outputs: Mapping,
    parameters: Mapping,
}

fn render(params: &[(&str, &str)]) -> Rendered {
    let doc =
        long_form(&serde_yaml_ng::from_str(include_str!("../../../infra/template.yaml")).expect("parses"));
    let parameters = doc["Parameters"].as_mapping().cloned().expect("Parameters");
    let param = |name: &str| -> Value {
        params.iter().find(|(n, _)| *n == name).map(|(_, v)| Value::String((*v).to_owned())).unwrap_or_else(
            || parameters.get(name).and_then(|p| p.get("Default")).cloned().unwrap_or(Value::Null),
        )
    };
    fn scalar(v: &Value, param: &dyn Fn(&str) -> Value) -> Value {
        match single(v, "Ref").and_then(Value::as_str) {
            Some(name) => param(name),
            None => v.clone(),
        }
    }
    fn eval(c: &Value, conditions: &Mapping, param: &dyn Fn(&str) -> Value) -> bool {
        if let Some(args) = single(c, "Fn::Equals").and_then(Value::as_sequence) {
            return scalar(&args[0], param) == scalar(&args[1], param);
        }
        if let Some(args) = single(c, "Fn::Not").and_then(Value::as_sequence) {
            return !eval(&args[0], conditions, param);
        }
        if let Some(args) = single(c, "Fn::And").and_then(Value::as_sequence) {
            return args.iter().all(|a| eval(a, conditions, param));
        }
        if let Some(args) = single(c, "Fn::Or").and_then(Value::as_sequence) {
            return args.iter().any(|a| eval(a, conditions, param));
        }
        if let Some(name) = single(c, "Condition").and_then(Value::as_str) {
            return eval(&conditions[name], conditions, param);
        }
        panic!("unsupported condition {c:?}")
    }
    let conditions = doc["Conditions"].as_mapping().cloned().unwrap_or_default();
    let holds = |name: &str| eval(&conditions[name], &conditions, &param);
    // Resolve `Fn::If` and drop `AWS::NoValue` (None = removed from its parent).
    fn resolve(v: &Value, holds: &dyn Fn(&str) -> bool) -> Option<Value> {
        if single(v, "Ref").and_then(Value::as_str) == Some("AWS::NoValue") {
            return None;
        }
        if let Some(args) = single(v, "Fn::If").and_then(Value::as_sequence) {
            let cond = args[0].as_str().expect("Fn::If condition name");
            return resolve(if holds(cond) { &args[1] } else { &args[2] }, holds);
        }
        Some(match v {
            Value::Mapping(m) => {
                Value::Mapping(m.iter().filter_map(|(k, v)| Some((k.clone(), resolve(v, holds)?))).collect())
            }
            Value::Sequence(s) => Value::Sequence(s.iter().filter_map(|v| resolve(v, holds)).collect()),
            other => other.clone(),
        })
    }
    let keep = |section: &str| -> Mapping {
        doc[section]
            .as_mapping()
            .into_iter()
            .flatten()
            .filter(|(_, r)| r.get("Condition").and_then(Value::as_str).is_none_or(&holds))
            .filter_map(|(k, r)| Some((k.clone(), resolve(r, &holds)?)))
            .collect()
    };
    Rendered { resources: keep("Resources"), outputs: keep("Outputs"), parameters }
}

/// Every logical id a rendered value refers to (`Ref`, `Fn::GetAtt`, `${X}` in `Fn::Sub`).
fn references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Mapping(m) => {
            if let Some(name) = single(v, "Ref").and_then(Value::as_str) {
                out.push(name.to_owned());
            } else if let Some(target) =
                single(v, "Fn::GetAtt").and_then(|g| g.get(0)).and_then(Value::as_str)
            {
                out.push(target.to_owned());
            } else if let Some(sub) = single(v, "Fn::Sub") {
                let text = sub.as_str().or_else(|| sub.get(0).and_then(Value::as_str)).unwrap_or_default();
                // `!Sub [text, {Name: value}]`: its own variables are not references.
                let own = sub.get(1).and_then(Value::as_mapping);
                for part in text.split("${").skip(1) {
                    let name = part.split('}').next().unwrap_or_default();
                    if !name.starts_with('!') && !own.is_some_and(|m| m.contains_key(name)) {
                        out.push(name.split('.').next().unwrap_or_default().to_owned());
                    }
                }
            }
            m.values().for_each(|v| references(v, out));
        }
        Value::Sequence(s) => s.iter().for_each(|v| references(v, out)),
        _ => {}
    }
}

fn iam_statements(r: &Rendered) -> Vec<Value> {
    let mut out = Vec::new();
    for (_, res) in of_type(&r.resources, "AWS::IAM::Role") {
        for policy in res["Properties"]["Policies"].as_sequence().into_iter().flatten() {
            out.extend(policy["PolicyDocument"]["Statement"].as_sequence().cloned().unwrap_or_default());
        }
    }
    out
}

fn actions(statement: &Value) -> Vec<String> {
    match &statement["Action"] {
        Value::String(s) => vec![s.clone()],
        Value::Sequence(s) => s.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

fn function_env(r: &Rendered, function: &str) -> Mapping {
    r.resources[function]["Properties"]["Environment"]["Variables"].as_mapping().cloned().unwrap_or_default()
}

fn assert_self_consistent(r: &Rendered, variant: &str) {
    let pseudo = ["AWS::AccountId", "AWS::Region", "AWS::Partition", "AWS::StackName", "AWS::URLSuffix"];
    let mut refs = Vec::new();
    references(&Value::Mapping(r.resources.clone()), &mut refs);
    references(&Value::Mapping(r.outputs.clone()), &mut refs);
    for name in refs {
        let known = r.resources.contains_key(name.as_str())
            || r.parameters.contains_key(name.as_str())
            || pseudo.contains(&name.as_str());
        assert!(known, "{variant}: a reference to {name}, which this variant does not create");
    }
}

#[test]
fn with_the_default_hot_store_nothing_touches_timestream_and_the_archive_is_queryable() {
    // The default must deploy in an account Timestream for LiveAnalytics refuses.
    let r = render(&[]);
    assert_eq!(r.parameters["HotStore"]["Default"].as_str(), Some("none"));
    assert_self_consistent(&r, "HotStore=none");
    for (id, res) in &r.resources {
        let ty = res["Type"].as_str().unwrap_or_default();
        assert!(!ty.starts_with("AWS::Timestream::"), "{id:?} ({ty}) is created without a hot store");
    }
    for s in iam_statements(&r) {
        assert!(actions(&s).iter().all(|a| !a.starts_with("timestream:")), "a Timestream grant: {s:?}");
    }
    let env = function_env(&r, "IngestTelemetryFunction");
    assert_eq!(env["FLEET_HOT_STORE"].get("Ref").and_then(Value::as_str), Some("HotStore"));
    for var in ["FLEET_TELEMETRY_DB", "FLEET_TELEMETRY_TABLE", "FLEET_HOT_WINDOW_DAYS"] {
        assert!(!env.contains_key(var), "{var} is set without a hot store");
    }
    // Athena reads the archive's partitions by projection: no crawler, no partition upkeep.
    let table = &r.resources["RawTelemetryGlueTable"]["Properties"]["TableInput"];
    assert_eq!(table["Parameters"]["projection.enabled"].as_str(), Some("true"));
    let location = table["Parameters"]["storage.location.template"]["Fn::Sub"].as_str().unwrap_or_default();
    assert!(location.ends_with("/raw/dt=${!dt}/hour=${!hour}/"), "{location}");
    let keys: Vec<&str> = table["PartitionKeys"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|k| k["Name"].as_str())
        .collect();
    assert_eq!(keys, ["dt", "hour"]);
}

#[test]
fn with_timestream_the_function_gets_the_table_its_grants_and_a_rejected_data_location() {
    let r = render(&[("HotStore", "timestream")]);
    assert_self_consistent(&r, "HotStore=timestream");
    assert_eq!(of_type(&r.resources, "AWS::Timestream::Table").count(), 1);
    let env = function_env(&r, "IngestTelemetryFunction");
    for var in ["FLEET_TELEMETRY_DB", "FLEET_TELEMETRY_TABLE", "FLEET_HOT_WINDOW_DAYS"] {
        assert!(env.contains_key(var), "{var} missing with Timestream");
    }
    let granted: Vec<String> = iam_statements(&r).iter().flat_map(actions).collect();
    assert!(granted.iter().any(|a| a == "timestream:WriteRecords"), "{granted:?}");
    let rejected = &r.resources["TelemetryTable"]["Properties"]["MagneticStoreWriteProperties"]
        ["MagneticStoreRejectedDataLocation"]["S3Configuration"];
    assert_eq!(rejected["BucketName"].get("Ref").and_then(Value::as_str), Some("ArchiveBucket"));
    assert!(r.resources.contains_key("TimestreamRejectedAlarm"));
}

fn dynamodb_actions(r: &Rendered, role: &str) -> Vec<String> {
    let policies = &r.resources[role]["Properties"]["Policies"];
    let mut granted: Vec<String> = policies
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|p| p["PolicyDocument"]["Statement"].as_sequence().cloned().unwrap_or_default())
        .flat_map(|s| actions(&s))
        .filter(|a| a.starts_with("dynamodb:"))
        .collect();
    granted.sort();
    granted
}

#[test]
fn presence_writes_device_presence_and_retires_only_certificates_a_rotation_superseded() {
    let r = render(&[]);
    // Devices table: BatchGetItem (cohorts), GetItem, then PutItem conditioned on the place
    // read, in a transaction with the Health table's gauge (UpdateItem). Certificates table,
    // when a rotated device first connects with its new certificate: GetItem (the serial's
    // entry, an inventory record), Query (its audit trail), PutItem (the record set INACTIVE,
    // the audit event), each held to the partition keys those items have.
    assert_eq!(
        dynamodb_actions(&r, "PresenceRole"),
        [
            "dynamodb:BatchGetItem",
            "dynamodb:GetItem",
            "dynamodb:GetItem",
            "dynamodb:PutItem",
            "dynamodb:PutItem",
            "dynamodb:Query",
            "dynamodb:UpdateItem"
        ]
    );
    assert_eq!(grant_resource(&r, "PresenceRole", "dynamodb:UpdateItem"), "HealthTable");
    assert_eq!(
        grant_resources(&r, "PresenceRole", "dynamodb:PutItem"),
        ["DevicesTable", "CertificatesTable"]
    );
    let leading_keys = |action: &str| -> Vec<String> {
        let statements = role_statements(&r, "PresenceRole");
        let on_certs = statements.iter().find(|s| {
            actions(s).iter().any(|a| a == action)
                && s["Resource"]["Fn::GetAtt"][0].as_str() == Some("CertificatesTable")
        });
        let keys = on_certs.map(|s| &s["Condition"]["ForAllValues:StringLike"]["dynamodb:LeadingKeys"]);
        keys.and_then(Value::as_sequence)
            .map(|k| k.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default()
    };
    assert_eq!(leading_keys("dynamodb:GetItem"), ["serial#*", "cert#*", "audit#*"]);
    assert_eq!(leading_keys("dynamodb:Query"), ["serial#*", "cert#*", "audit#*"]);
    assert_eq!(leading_keys("dynamodb:PutItem"), ["cert#*", "audit#*"], "no allowlist or counter write");
    // AWS IoT: a thing's certificates, and theirs only; no policy, thing or CA call.
    for (action, resource) in [
        ("iot:ListThingPrincipals", ":thing/*"),
        ("iot:DescribeCertificate", ":cert/*"),
        ("iot:UpdateCertificate", ":cert/*"),
    ] {
        let granted = grant_resources(&r, "PresenceRole", action);
        assert!(granted.len() == 1 && granted[0].ends_with(resource), "{action}: {granted:?}");
    }
    let iot: Vec<String> =
        role_actions(&r, "PresenceRole").into_iter().filter(|a| a.starts_with("iot:")).collect();
    assert_eq!(iot, ["iot:DescribeCertificate", "iot:ListThingPrincipals", "iot:UpdateCertificate"]);
    let env = function_env(&r, "PresenceFunction");
    let vars: Vec<&str> = env.keys().filter_map(Value::as_str).collect();
    assert_eq!(
        vars,
        ["FLEET_DEVICES_TABLE", "FLEET_HEALTH_TABLE", "FLEET_CERTIFICATES_TABLE"],
        "presence gets only its own resources"
    );
    let rule = &r.resources["PresenceRule"]["Properties"]["TopicRulePayload"];
    assert_eq!(rule["Sql"].as_str(), Some("SELECT * FROM '$aws/events/presence/+/+'"));
    assert!(rule.get("ErrorAction").is_some(), "the presence rule has an error action");
    let events = &r.resources["PresenceFunction"]["Properties"]["Events"]["LifecycleEvents"]["Properties"];
    assert_eq!(events["FunctionResponseTypes"][0].as_str(), Some("ReportBatchItemFailures"));
}

#[test]
fn the_ota_orchestrator_reads_the_devices_and_certificates_tables_and_never_writes_them() {
    // A firmware stage picks from a Scan of the registry; a rotation's from the marks due (a
    // Query of the sparse index, never of the table) and those devices by key; a rotation
    // stage's gate reads a device's mark and presence (GetItem), and its serial's allowlist entry.
    let r = render(&[]);
    for action in ["dynamodb:Scan", "dynamodb:GetItem", "dynamodb:BatchGetItem"] {
        let granted = grant_resources(&r, "OtaOrchestratorRole", action);
        assert!(granted.iter().any(|g| g == "DevicesTable"), "{action}: {granted:?}");
    }
    let queried = grant_resources(&r, "OtaOrchestratorRole", "dynamodb:Query");
    let index = format!("${{DevicesTable.Arn}}/index/{ROTATION_DUE_INDEX}");
    assert!(queried.contains(&index), "{queried:?}");
    assert!(!queried.iter().any(|g| g == "DevicesTable"), "{queried:?}");
    // The index is the adapter's: sparse on its partition key, sorted by thing, with the mark.
    let table = &r.resources["DevicesTable"]["Properties"];
    let indexes = table["GlobalSecondaryIndexes"].as_sequence().cloned().unwrap_or_default();
    let due = indexes.iter().find(|i| i["IndexName"].as_str() == Some(ROTATION_DUE_INDEX)).expect("index");
    let keys: Vec<(&str, &str)> = due["KeySchema"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|k| Some((k["AttributeName"].as_str()?, k["KeyType"].as_str()?)))
        .collect();
    assert_eq!(keys, [(ROTATION_QUEUE, "HASH"), ("thing", "RANGE")]);
    assert_eq!(due["Projection"]["NonKeyAttributes"][0].as_str(), Some("mark"));
    for action in
        ["dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:BatchWriteItem"]
    {
        let granted = grant_resources(&r, "OtaOrchestratorRole", action);
        let written = granted.iter().any(|g| g == "DevicesTable" || g == "CertificatesTable");
        assert!(!written, "{action}: {granted:?}");
    }
    // Of the Certificates table, a serial's allowlist entry only (its current certificate).
    let statements = role_statements(&r, "OtaOrchestratorRole");
    let certs: Vec<&Value> =
        statements.iter().filter(|s| format!("{:?}", s["Resource"]).contains("CertificatesTable")).collect();
    assert_eq!(certs.len(), 1, "{certs:?}");
    assert_eq!(actions(certs[0]), ["dynamodb:GetItem"]);
    let keys = format!("{:?}", certs[0]["Condition"]["ForAllValues:StringLike"]["dynamodb:LeadingKeys"]);
    assert!(keys.contains("serial#*") && !keys.contains("cert#") && !keys.contains("audit#"), "{keys}");
    let env = function_env(&r, "OtaOrchestratorFunction");
    assert!(env.keys().any(|k| k.as_str() == Some("FLEET_CERTIFICATES_TABLE")), "{env:?}");
}

/// Every action `role` grants, sorted.
fn role_actions(r: &Rendered, role: &str) -> Vec<String> {
    let mut granted: Vec<String> = role_statements(r, role).iter().flat_map(actions).collect();
    granted.sort();
    granted
}

fn role_statements(r: &Rendered, role: &str) -> Vec<Value> {
    r.resources[role]["Properties"]["Policies"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|p| p["PolicyDocument"]["Statement"].as_sequence().cloned().unwrap_or_default())
        .collect()
}

/// The resource of each of `role`'s statements granting `action`: a logical id (`Fn::GetAtt`)
/// or the `Fn::Sub` text.
fn grant_resources(r: &Rendered, role: &str, action: &str) -> Vec<String> {
    role_statements(r, role)
        .iter()
        .filter(|s| actions(s).iter().any(|a| a == action))
        .map(|s| {
            let resource = &s["Resource"];
            resource["Fn::GetAtt"][0].as_str().or(resource["Fn::Sub"].as_str()).unwrap_or_default().to_owned()
        })
        .collect()
}

#[test]
fn twin_sync_reads_and_conditionally_writes_twins_only() {
    // TwinsTable as twin::sync uses it: GetItem, then PutItem conditioned on the revision;
    // the scheduled sweep queries the drift index, and only that index.
    let r = render(&[]);
    assert_eq!(
        dynamodb_actions(&r, "TwinSyncRole"),
        ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query"]
    );
    let statements = r.resources["TwinSyncRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    let query = statements.iter().find(|s| actions(s).iter().any(|a| a == "dynamodb:Query"));
    let resource = format!("{:?}", query.map(|s| &s["Resource"]));
    assert!(resource.contains("${TwinsTable.Arn}/index/by_drift"), "Query granted on {resource}");
    let env = function_env(&r, "TwinSyncFunction");
    let vars: Vec<&str> = env.keys().filter_map(Value::as_str).collect();
    assert_eq!(vars, ["FLEET_TWINS_TABLE"], "twin-sync gets only its own resources");
}

#[test]
fn twin_sync_may_release_stale_desired_keys_only_when_the_iot_data_endpoint_is_given() {
    let shadow_actions = |r: &Rendered| -> Vec<String> {
        let statements = r.resources["TwinSyncRole"]["Properties"]["Policies"][0]["PolicyDocument"]
            ["Statement"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        statements.iter().flat_map(actions).filter(|a| a.starts_with("iot:")).collect()
    };
    // Without the endpoint: no shadow access, no variable (release policies only report).
    let r = render(&[]);
    assert!(shadow_actions(&r).is_empty());
    assert!(!function_env(&r, "TwinSyncFunction").contains_key("FLEET_IOT_DATA_ENDPOINT"));
    // With it: read a shadow and update it, on the account's things, and the variable.
    let endpoint = "https://abc-ats.iot.us-east-1.amazonaws.com";
    let r = render(&[("IotDataEndpoint", endpoint)]);
    assert_eq!(shadow_actions(&r), ["iot:GetThingShadow", "iot:UpdateThingShadow"]);
    let env = function_env(&r, "TwinSyncFunction");
    let variable = env.get("FLEET_IOT_DATA_ENDPOINT").and_then(|v| single(v, "Ref")).and_then(Value::as_str);
    assert_eq!(variable, Some("IotDataEndpoint"));
    assert_self_consistent(&r, "IotDataEndpoint set");
}

#[test]
fn the_ingest_role_grants_the_devices_table_calls_ingest_makes_and_no_more() {
    // DevicesTable: BatchGetItem (enrichment), BatchExecuteStatement of PartiQL UPDATE and
    // INSERT (state), which IAM authorises per statement type.
    let r = render(&[]);
    // HealthTable: UpdateItem (ADD to the health counters).
    let granted = dynamodb_actions(&r, "IngestTelemetryRole");
    assert_eq!(
        granted,
        ["dynamodb:BatchGetItem", "dynamodb:PartiQLInsert", "dynamodb:PartiQLUpdate", "dynamodb:UpdateItem"]
    );
    assert_eq!(grant_resource(&r, "IngestTelemetryRole", "dynamodb:UpdateItem"), "HealthTable");
}

/// The resource (logical id) of the one statement of `role` granting `action`.
fn grant_resource(r: &Rendered, role: &str, action: &str) -> String {
    let policies = &r.resources[role]["Properties"]["Policies"];
    let statements: Vec<Value> = policies
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|p| p["PolicyDocument"]["Statement"].as_sequence().cloned().unwrap_or_default())
        .filter(|s| actions(s).iter().any(|a| a == action))
        .collect();
    assert_eq!(statements.len(), 1, "{role}: {action} in {} statements", statements.len());
    statements[0]["Resource"]["Fn::GetAtt"][0].as_str().unwrap_or_default().to_owned()
}

#[test]
fn fleet_health_runs_every_minute_on_the_health_table_only_and_every_slo_has_burn_rate_alarms() {
    let r = render(&[]);
    let events = &r.resources["FleetHealthFunction"]["Properties"]["Events"]["EveryMinute"];
    assert_eq!(events["Properties"]["Schedule"].as_str(), Some("rate(1 minute)"));
    let env = function_env(&r, "FleetHealthFunction");
    let vars: Vec<&str> = env.keys().filter_map(Value::as_str).collect();
    assert_eq!(vars, ["FLEET_HEALTH_TABLE"]);
    assert_eq!(
        dynamodb_actions(&r, "FleetHealthRole"),
        ["dynamodb:BatchWriteItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query"]
    );
    assert_eq!(grant_resource(&r, "FleetHealthRole", "dynamodb:Query"), "HealthTable");
    // Every SLO of the catalog: a page and a ticket alarm on its two burn-rate windows, per stage.
    let catalog = fleet_shared::health::slo::Catalog::builtin();
    let slo_alarms: Vec<&Value> = of_type(&r.resources, "AWS::CloudWatch::Alarm")
        .filter(|(id, _)| id.starts_with("Slo"))
        .map(|(_, a)| a)
        .collect();
    assert_eq!(slo_alarms.len(), catalog.slos.len() * catalog.alerts.len());
    for a in slo_alarms {
        let metrics = a["Properties"]["Metrics"].as_sequence().cloned().unwrap_or_default();
        let stats: Vec<&Value> = metrics.iter().filter_map(|m| m.get("MetricStat")).collect();
        assert_eq!(stats.len(), 2, "a long and a short window");
        for st in stats {
            let dims: Vec<&str> = st["Metric"]["Dimensions"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|d| d["Name"].as_str())
                .collect();
            assert_eq!(dims, ["Stage", "Slo", "Cohort", "Window"]);
        }
        assert!(metrics.iter().any(|m| m["Expression"].as_str().is_some_and(|e| e.contains(" AND "))));
    }
    assert!(r.resources.contains_key("HealthDashboard"));
}

#[test]
fn grants_name_their_resources_and_failures_have_separate_queues() {
    for variant in [&[][..], &[("HotStore", "timestream")][..]] {
        let r = render(variant);
        // "*" only where the service has no resource types to name.
        let star_ok = [
            "xray:PutTraceSegments",
            "xray:PutTelemetryRecords",
            "timestream:DescribeEndpoints",
            // AWS IoT's list calls over the whole registry (resource type: none).
            "iot:ListCertificates",
            "iot:ListPrincipalThings",
            // The account's data endpoint (command-dispatch, when IotDataEndpoint is empty).
            "iot:DescribeEndpoint",
        ];
        for s in iam_statements(&r) {
            if s["Resource"].as_str() == Some("*") {
                assert!(actions(&s).iter().all(|a| star_ok.contains(&a.as_str())), "Resource \"*\": {s:?}");
            }
        }
        // Functions use their own roles: SAM's generated role adds managed policies on "*".
        for (id, f) in of_type(&r.resources, "AWS::Serverless::Function") {
            assert!(f["Properties"].get("Role").is_some(), "{id} has no role of its own");
            assert!(f["Properties"].get("Policies").is_none(), "{id}: Policies apply only to SAM's role");
            // Async failures go to a destination of their own, not the SQS redrive queue. A
            // function with no event source (the provisioning hook: AWS IoT calls it
            // synchronously) has no async failures.
            if f["Properties"].get("Events").is_none() {
                continue;
            }
            // A scheduled tick that is never retried (fleet-health: the next minute's run closes
            // what this one missed) has nothing to keep.
            let events = f["Properties"]["Events"].as_mapping().cloned().unwrap_or_default();
            let only_schedules = events.values().all(|e| e["Type"].as_str() == Some("Schedule"));
            let no_retries = f["Properties"]["EventInvokeConfig"]["MaximumRetryAttempts"].as_u64() == Some(0);
            if only_schedules && no_retries {
                continue;
            }
            let on_failure = &f["Properties"]["EventInvokeConfig"]["DestinationConfig"]["OnFailure"];
            let destination = on_failure["Destination"]["Fn::GetAtt"][0].as_str().unwrap_or_default();
            assert!(!destination.is_empty(), "{id} has no on-failure destination");
            for (_, q) in of_type(&r.resources, "AWS::SQS::Queue") {
                let dlq = q["Properties"]["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0].as_str();
                assert_ne!(dlq, Some(destination), "{id}: async failures share the SQS redrive queue");
            }
        }
        // Custom metrics are per stage: an alarm on them names its Stage.
        for (id, a) in of_type(&r.resources, "AWS::CloudWatch::Alarm") {
            let p = &a["Properties"];
            if p["Namespace"].as_str() == Some("Fleetline") {
                let dims: Vec<&str> = p["Dimensions"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d["Name"].as_str())
                    .collect();
                assert!(dims.contains(&"Stage"), "{id} watches a Fleetline metric of every stage: {dims:?}");
            }
        }
        let watched: Vec<&str> = of_type(&r.resources, "AWS::CloudWatch::Alarm")
            .filter_map(|(_, a)| a["Properties"]["MetricName"].as_str())
            .collect();
        assert!(watched.contains(&"InitFailed"), "no init-failure alarm: {watched:?}");
    }
}

#[test]
fn fleet_provisioning_gives_each_device_a_thing_an_active_certificate_and_the_device_policy() {
    let r = render(&[]);
    let props = &r.resources["FleetProvisioningTemplate"]["Properties"];
    let sub = props["TemplateBody"]["Fn::Sub"].as_sequence().expect("TemplateBody is a !Sub with variables");
    // The body is JSON once the policy name is put in.
    let body_text =
        sub[0].as_str().unwrap_or_default().replace("${DevicePolicyName}", "fleetline-dev-device");
    let body: serde_json::Value =
        serde_json::from_str(&body_text).expect("the provisioning template body is JSON");
    let resources = &body["Resources"];
    assert_eq!(resources["thing"]["Properties"]["ThingName"]["Ref"], "SerialNumber");
    assert_eq!(resources["certificate"]["Properties"]["Status"], "ACTIVE");
    assert_eq!(resources["policy"]["Properties"]["PolicyName"], "fleetline-dev-device");
    assert_eq!(sub[1]["DevicePolicyName"]["Ref"].as_str(), Some("DevicePolicy"), "attaches DevicePolicy");
    assert_eq!(props["ProvisioningRoleArn"]["Fn::GetAtt"][0].as_str(), Some("ProvisioningRole"));
    // The pre-provisioning hook checks every serial against the allowlist: enabled.
    assert_eq!(props["Enabled"].as_bool(), Some(true));
    assert_eq!(
        props["PreProvisioningHook"]["TargetArn"]["Fn::GetAtt"][0].as_str(),
        Some("ProvisioningHookFunction")
    );
    // A claim certificate may use the provisioning topics of this template only.
    let claim = format!("{:?}", r.resources["ClaimPolicy"]["Properties"]["PolicyDocument"]);
    assert!(claim.contains("$aws/certificates/create/*"), "{claim}");
    assert!(claim.contains("$aws/certificates/create-from-csr/*"), "{claim}");
    assert!(claim.contains("$aws/provisioning-templates/fleetline-${Stage}-devices/provision/*"), "{claim}");
    assert!(!claim.contains("dt/fleet"), "a claim certificate cannot publish telemetry: {claim}");
    // ... and connects under claim session client ids only, never a device's (it would take the
    // device's session over).
    let statements = r.resources["ClaimPolicy"]["Properties"]["PolicyDocument"]["Statement"]
        .as_sequence()
        .expect("statements");
    let connect: Vec<String> = statements
        .iter()
        .filter(|s| s["Action"].as_str() == Some("iot:Connect"))
        .map(|s| format!("{:?}", s["Resource"]))
        .collect();
    let prefix = fleet_shared::certs::hook::CLAIM_CLIENT_PREFIX;
    assert!(
        connect.len() == 1 && connect[0].contains(&format!(":client/{prefix}*")),
        "the claim connects as client/{prefix}* only: {connect:?}"
    );
    // A device may rotate its certificate: a certificate for its CSR, then RegisterThing with
    // its own certificate as the claim; never CreateKeysAndCertificate (answers carry keys).
    let device = format!("{:?}", r.resources["DevicePolicy"]["Properties"]["PolicyDocument"]);
    assert!(device.contains("topic/$aws/certificates/create-from-csr/*"), "{device}");
    assert!(device.contains("topicfilter/$aws/certificates/create-from-csr/*"), "{device}");
    assert!(
        device.contains("topic/$aws/provisioning-templates/fleetline-${Stage}-devices/provision/*"),
        "{device}"
    );
    assert!(!device.contains("$aws/certificates/create/"), "{device}");
}

#[test]
fn only_aws_iot_may_call_the_provisioning_hook_which_writes_certificates_and_registers_devices() {
    let r = render(&[]);
    // The permission: the IoT service, this account, this stack's provisioning template.
    let p = &r.resources["ProvisioningHookPermission"]["Properties"];
    assert_eq!(p["Principal"].as_str(), Some("iot.amazonaws.com"));
    assert_eq!(single(&p["SourceAccount"], "Ref").and_then(Value::as_str), Some("AWS::AccountId"));
    let source = format!("{:?}", p["SourceArn"]);
    assert!(source.contains(":provisioningtemplate/fleetline-${Stage}-devices"), "{source}");
    // The template names the hook, and that name is the one the permission allows.
    let t = &r.resources["FleetProvisioningTemplate"];
    let hook = &t["Properties"]["PreProvisioningHook"]["TargetArn"]["Fn::GetAtt"][0];
    assert_eq!(hook.as_str(), Some("ProvisioningHookFunction"));
    let name = format!("{:?}", t["Properties"]["TemplateName"]);
    assert!(name.contains("fleetline-${Stage}-devices"), "{name}");
    // The role: Certificates items and device registration, nothing else in DynamoDB.
    assert_eq!(
        dynamodb_actions(&r, "ProvisioningHookRole"),
        ["dynamodb:BatchWriteItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"]
    );
    let env = function_env(&r, "ProvisioningHookFunction");
    let vars: Vec<&str> = env.keys().filter_map(Value::as_str).collect();
    assert_eq!(vars, ["FLEET_CERTIFICATES_TABLE", "FLEET_DEVICES_TABLE"]);
    // AWS IoT waits 5 s: the function's timeout is no longer.
    assert_eq!(r.resources["ProvisioningHookFunction"]["Properties"]["Timeout"].as_u64(), Some(5));
}

#[test]
fn the_expiry_check_runs_daily_and_reads_the_expiry_index_only() {
    let r = render(&[]);
    let f = &r.resources["CertExpiryCheckFunction"]["Properties"];
    assert_eq!(f["Events"]["Daily"]["Properties"]["Schedule"].as_str(), Some("rate(1 day)"));
    // Reconciliation: hourly slices of a weekly sweep, told apart by their input.
    let reconcile = &f["Events"]["Reconcile"]["Properties"];
    assert_eq!(reconcile["Schedule"].as_str(), Some("rate(1 hour)"));
    let input: Value =
        serde_yaml_ng::from_str(reconcile["Input"].as_str().unwrap_or_default()).unwrap_or_default();
    assert_eq!(input["task"].as_str(), Some("reconcile"));
    // DynamoDB: Query on the by_expiry index, records by key (reconciliation), device marks;
    // S3: reports only.
    assert_eq!(
        dynamodb_actions(&r, "CertExpiryCheckRole"),
        ["dynamodb:BatchWriteItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query"]
    );
    let statements = r.resources["CertExpiryCheckRole"]["Properties"]["Policies"][0]["PolicyDocument"]
        ["Statement"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    let resource_of = |action: &str| {
        statements
            .iter()
            .find(|s| actions(s).iter().any(|a| a == action))
            .map(|s| format!("{:?}", s["Resource"]))
    };
    assert!(resource_of("dynamodb:Query").is_some_and(|r| r.contains("/index/by_expiry")));
    // AWS IoT: the registry's reads, named, never iot:* and never a write.
    let iot: Vec<String> = statements.iter().flat_map(actions).filter(|a| a.starts_with("iot:")).collect();
    assert_eq!(
        iot,
        [
            "iot:ListCertificates",
            "iot:ListPrincipalThings",
            "iot:DescribeCertificate",
            "iot:ListThingPrincipals"
        ]
    );
    assert!(resource_of("iot:DescribeCertificate").is_some_and(|r| r.contains(":cert/*")));
    assert!(resource_of("s3:PutObject").is_some_and(|r| r.contains("/reports/*")));
    assert!(resource_of("s3:GetObject").is_some_and(|r| r.contains("/reports/*")));
    let env = function_env(&r, "CertExpiryCheckFunction");
    let vars: Vec<&str> = env.keys().filter_map(Value::as_str).collect();
    assert_eq!(
        vars,
        [
            "FLEET_CERTIFICATES_TABLE",
            "FLEET_DEVICES_TABLE",
            "FLEET_ARCHIVE_BUCKET",
            "FLEET_CERT_EXPIRY_THRESHOLD_DAYS"
        ]
    );
    // The threshold parameter holds Device Defender's range.
    let p = &r.parameters["CertExpiryThresholdDays"];
    assert_eq!(
        (p["MinValue"].as_u64(), p["MaxValue"].as_u64(), p["Default"].as_u64()),
        (Some(30), Some(3652), Some(30))
    );
}

#[test]
fn commands_are_published_only_by_dispatch_with_its_key_and_acks_reach_command_ack() {
    let r = render(&[]);
    assert_eq!(
        dynamodb_actions(&r, "CommandDispatchRole"),
        ["dynamodb:BatchGetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:UpdateItem"]
    );
    assert_eq!(grant_resource(&r, "CommandDispatchRole", "dynamodb:PutItem"), "CommandsTable");
    let statements = iam_statements(&r);
    let publish: Vec<&Value> =
        statements.iter().filter(|s| actions(s).iter().any(|a| a == "iot:Publish")).collect();
    assert_eq!(publish.len(), 1, "only command-dispatch publishes");
    let topic = format!("{:?}", publish[0]["Resource"]);
    assert!(topic.contains("topic/cmd/fleet/*/req"), "{topic}");
    assert!(statements.iter().any(|s| actions(s) == ["ssm:GetParameter"]), "the signing key from SSM");
    let env = function_env(&r, "CommandDispatchFunction");
    for var in
        ["FLEET_COMMANDS_TABLE", "FLEET_COMMAND_KEY_PARAM", "FLEET_COMMAND_KEY_ID", "FLEET_IOT_DATA_ENDPOINT"]
    {
        assert!(env.contains_key(var), "command-dispatch has no {var}");
    }
    assert_eq!(
        dynamodb_actions(&r, "CommandAckRole"),
        ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"]
    );
    let rule = &r.resources["CommandAckRule"]["Properties"]["TopicRulePayload"];
    assert_eq!(
        rule["Sql"].as_str(),
        Some("SELECT *, topic(3) AS thing, timestamp() AS rx_ms FROM 'cmd/fleet/+/res'")
    );
    assert!(rule.get("ErrorAction").is_some());
    let policy = format!("{:?}", r.resources["DevicePolicy"]["Properties"]["PolicyDocument"]);
    assert!(policy.contains("iot:Connection.Thing.ThingName}/res"), "devices may ack: {policy}");
}
