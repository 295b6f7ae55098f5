//! What `infra/template.yaml` promises a first deploy into a new account: nothing left behind
//! when it fails, nothing whose name blocks the next attempt, and every alarm notifying someone.
//! (cfn-lint in scripts/test.sh checks the template against CloudFormation's schemas.)

use serde_yaml_ng::{Mapping, Value};

fn resources() -> Mapping {
    let text = include_str!("../../infra/template.yaml");
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
    ] {
        assert!(watched.iter().any(|m| m == metric), "no alarm on {metric}: {watched:?}");
    }
    let topic = resources.get("AlarmTopic").expect("a topic the stack creates when none is given");
    assert_eq!(topic.get("Condition").and_then(Value::as_str), Some("CreateAlarmTopic"));
}

#[test]
fn the_rule_role_trusts_only_this_rule_and_the_archive_lifecycle_stays_valid() {
    let text = include_str!("../../infra/template.yaml");
    let doc: Value = serde_yaml_ng::from_str(text).expect("the template parses");
    let trust = &doc["Resources"]["TopicRuleRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0];
    assert!(trust["Condition"]["StringEquals"].get("aws:SourceAccount").is_some(), "{trust:?}");
    assert!(trust["Condition"]["ArnLike"].get("aws:SourceArn").is_some(), "{trust:?}");
    // Expiration must come after the last transition (90 days) or S3 refuses the rules.
    let min = doc["Parameters"]["RawArchiveRetentionDays"]["MinValue"].as_u64();
    assert!(min.is_some_and(|m| m > 90), "RawArchiveRetentionDays MinValue {min:?}");
}
