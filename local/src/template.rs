//! Reads what the local IoT Core runs from `infra/template.yaml` — the same file that deploys:
//! the topic rules (so the local rules engine runs exactly the rules the cloud runs), the
//! functions' schedules, the device and claim policies, and the fleet-provisioning templates
//! (their body and pre-provisioning hook, see [`crate::provisioning`]).
//!
//! Each enabled `AWS::IoT::TopicRule` becomes a [`Rule`]: its SQL parsed (see [`super::sql`]) and
//! its action resolved to the function it feeds in the cloud: an `Sqs` action to the function
//! whose SQS event reads that queue (with the event's batch size), a `Lambda` action to that
//! function. Anything else fails at start-up naming the rule and the construct.

use serde_yaml_ng::Value;

use crate::policy::{self, IotPolicy, PolicyError};
use crate::rules::sql::{self, Statement};

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("parsing {path}: {source}")]
    Parse { path: String, source: serde_yaml_ng::Error },
    #[error("topic rule {rule}: {problem}")]
    Rule { rule: String, problem: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Everything the local IoT Core takes from a template.
#[derive(Debug, Clone)]
pub struct Template {
    pub rules: Vec<Rule>,
    pub schedules: Vec<Schedule>,
    /// The device policy (`None` when the template declares none: every client may do anything).
    pub device_policy: Option<IotPolicy>,
    /// The policy of the provisioning claim certificate ([`CLAIM_POLICY`]; `None`: the
    /// template has none, and a claim may do anything).
    pub claim_policy: Option<IotPolicy>,
    /// Fleet-provisioning templates (`AWS::IoT::ProvisioningTemplate`).
    pub provisioning: Vec<ProvisioningTemplate>,
}

/// The logical id of the claim certificate's IoT policy.
pub const CLAIM_POLICY: &str = "ClaimPolicy";

/// A fleet-provisioning template, as `RegisterThing` runs it.
#[derive(Debug, Clone)]
pub struct ProvisioningTemplate {
    pub logical_id: String,
    /// The deployed name (`TemplateName`, parameters at their defaults): what devices address
    /// in `$aws/provisioning-templates/<name>/provision/json`.
    pub name: String,
    /// The pre-provisioning hook's function (logical id), if the template has a hook.
    pub hook: Option<String>,
    pub body: crate::provisioning::TemplateBody,
}

/// The logical id of the devices' IoT policy when the template has several.
pub const DEVICE_POLICY: &str = "DevicePolicy";

impl Template {
    pub fn read(text: &str) -> Result<Template, TemplateError> {
        let doc = document(text)?;
        let mut policies = policy::from_template(&doc)?;
        // Devices connect with their own certificate's policy: the only one, or the one named
        // `DevicePolicy` (others, like the claim certificate's, belong to other principals).
        let device_policy = match policies.iter().position(|p| p.name == DEVICE_POLICY) {
            Some(i) => Some(policies.swap_remove(i)),
            None if policies.len() <= 1 => policies.pop(),
            None => {
                let names: Vec<_> = policies.iter().map(|p| p.name.as_str()).collect();
                return Err(TemplateError::Rule {
                    rule: "AWS::IoT::Policy".into(),
                    problem: format!(
                        "which is the device policy? name it {DEVICE_POLICY}; found {}",
                        names.join(", ")
                    ),
                });
            }
        };
        let claim_policy =
            policies.iter().position(|p| p.name == CLAIM_POLICY).map(|i| policies.swap_remove(i));
        Ok(Template {
            rules: rules_of(&doc)?,
            schedules: schedules_of(&doc)?,
            device_policy,
            claim_policy,
            provisioning: provisioning_of(&doc)?,
        })
    }

    /// Every function a rule, queue or schedule invokes.
    pub fn invoked_functions(&self) -> impl Iterator<Item = (&str, String)> {
        let from_rules = self.rules.iter().flat_map(|r| {
            r.targets.iter().map(move |t| match t {
                Target::Queue { function, queue, .. } => {
                    (function.as_str(), format!("queue {queue} of topic rule {}", r.name))
                }
                Target::Function { function } => (function.as_str(), format!("topic rule {}", r.name)),
            })
        });
        let from_schedules =
            self.schedules.iter().map(|s| (s.function.as_str(), format!("schedule {}", s.expression)));
        let from_hooks = self.provisioning.iter().filter_map(|t| {
            Some((
                t.hook.as_deref()?,
                format!("the pre-provisioning hook of provisioning template {}", t.name),
            ))
        });
        from_rules.chain(from_schedules).chain(from_hooks)
    }
}

/// The string of a `TemplateBody`: plain, `!Sub` / `Fn::Sub` of one, or `!Sub [string, vars]`
/// (the variables name policies and the like, inside JSON strings: the body is JSON either way).
fn sub_body(v: &Value) -> Option<&str> {
    let list = match v {
        Value::Tagged(t) if t.tag == "!Sub" => t.value.as_sequence(),
        Value::Mapping(m) => m.get("Fn::Sub").and_then(Value::as_sequence),
        _ => None,
    };
    match list {
        Some(list) => list.first().and_then(Value::as_str),
        None => policy::sub_string(v),
    }
}

/// Every enabled `AWS::IoT::ProvisioningTemplate`; a construct the local IoT Core cannot run
/// fails naming the template.
fn provisioning_of(doc: &Value) -> Result<Vec<ProvisioningTemplate>, TemplateError> {
    let parameters = parameter_defaults(doc);
    let mut out = Vec::new();
    let Some(resources) = doc.get("Resources").and_then(Value::as_mapping) else { return Ok(out) };
    for (id, r) in resources {
        if r.get("Type").and_then(Value::as_str) != Some("AWS::IoT::ProvisioningTemplate") {
            continue;
        }
        let id = id.as_str().unwrap_or_default().to_owned();
        let fail =
            |problem: String| TemplateError::Rule { rule: format!("provisioning template {id}"), problem };
        let props = r.get("Properties").ok_or_else(|| fail("no Properties".into()))?;
        if props.get("Enabled").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let name = props
            .get("TemplateName")
            .and_then(policy::sub_string)
            .map(|n| with_parameters(n, &parameters))
            .unwrap_or_else(|| id.clone());
        let hook = match props.get("PreProvisioningHook") {
            None => None,
            Some(h) => Some(
                h.get("TargetArn")
                    .and_then(reference)
                    .ok_or_else(|| fail("PreProvisioningHook without a !GetAtt TargetArn".into()))?,
            ),
        };
        let body =
            props.get("TemplateBody").and_then(sub_body).ok_or_else(|| fail("no TemplateBody".into()))?;
        let body = crate::provisioning::TemplateBody::parse(body).map_err(fail)?;
        out.push(ProvisioningTemplate { logical_id: id, name, hook, body });
    }
    Ok(out)
}

fn document(text: &str) -> Result<Value, TemplateError> {
    serde_yaml_ng::from_str(text).map_err(|source| TemplateError::Parse { path: "template".into(), source })
}

/// Where a rule's output goes, locally as in the cloud.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// An SQS queue consumed by `function` in batches of up to `batch_size`, at most
    /// `max_concurrency` batches at a time (the event's `ScalingConfig.MaximumConcurrency`;
    /// without one, Lambda starts with 5 concurrent batches).
    Queue { queue: String, function: String, batch_size: usize, max_concurrency: usize },
    /// A direct rule → Lambda invocation.
    Function { function: String },
}

/// A function's `Schedule` event: a timer in the local stack.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub function: String,
    pub expression: String,
    pub every: std::time::Duration,
    /// The event's `Input` (JSON): sent instead of EventBridge's scheduled event, as AWS does.
    pub input: Option<serde_json::Value>,
}

/// `rate(N minute|minutes|hour|hours|day|days)`; `cron(...)` is not supported locally.
pub fn parse_rate(expression: &str) -> Result<std::time::Duration, String> {
    let inner = expression
        .strip_prefix("rate(")
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("schedule {expression:?} is not supported locally (rate(...) only)"))?;
    let (n, unit) = inner
        .trim()
        .split_once(' ')
        .ok_or_else(|| format!("schedule {expression:?}: expected rate(N unit)"))?;
    let n: u64 = n.parse().map_err(|_| format!("schedule {expression:?}: {n:?} is not a whole number"))?;
    let secs = match unit.trim() {
        "minute" | "minutes" => 60,
        "hour" | "hours" => 3600,
        "day" | "days" => 86_400,
        other => return Err(format!("schedule {expression:?}: unknown unit {other:?}")),
    };
    if n == 0 {
        return Err(format!("schedule {expression:?}: the rate must be positive"));
    }
    Ok(std::time::Duration::from_secs(n * secs))
}

/// Every `Schedule` event of every function in the template.
pub fn schedules(text: &str) -> Result<Vec<Schedule>, TemplateError> {
    schedules_of(&document(text)?)
}

fn schedules_of(doc: &Value) -> Result<Vec<Schedule>, TemplateError> {
    let mut out = Vec::new();
    let Some(resources) = doc.get("Resources").and_then(Value::as_mapping) else { return Ok(out) };
    for (id, r) in resources {
        let (Some(function), Some(events)) =
            (id.as_str(), r.get("Properties").and_then(|p| p.get("Events")).and_then(Value::as_mapping))
        else {
            continue;
        };
        for (_, e) in events {
            if !matches!(e.get("Type").and_then(Value::as_str), Some("Schedule" | "ScheduleV2")) {
                continue;
            }
            let expression = e
                .get("Properties")
                .and_then(|p| p.get("Schedule").or_else(|| p.get("ScheduleExpression")))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let fail = |problem| TemplateError::Rule { rule: format!("{function} schedule"), problem };
            let every = parse_rate(&expression).map_err(fail)?;
            let input = match e.get("Properties").and_then(|p| p.get("Input")) {
                None => None,
                Some(Value::String(json)) => Some(
                    serde_json::from_str(json).map_err(|err| fail(format!("Input is not JSON: {err}")))?,
                ),
                Some(_) => return Err(fail("Input must be a JSON string".to_owned())),
            };
            out.push(Schedule { function: function.to_owned(), expression, every, input });
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The rule's logical id in the template.
    pub name: String,
    /// The name it is deployed under (`RuleName`, parameters at their defaults): what Basic
    /// Ingest topics (`$aws/rules/<name>/...`) address.
    pub deployed_name: String,
    pub sql: String,
    pub statement: Statement,
    pub targets: Vec<Target>,
}

/// Each template parameter's default value (what a deploy without overrides uses; the local
/// IoT Core runs as that deployment, e.g. `Stage=dev`).
pub fn parameter_defaults(doc: &Value) -> std::collections::HashMap<String, String> {
    let Some(params) = doc.get("Parameters").and_then(Value::as_mapping) else { return Default::default() };
    params
        .iter()
        .filter_map(|(k, v)| {
            let default = match v.get("Default")? {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((k.as_str()?.to_owned(), default))
        })
        .collect()
}

/// `text` with every `${Parameter}` replaced by its value; `${!x}` escapes and `${AWS::...}`
/// pseudo parameters are left as they are.
pub fn with_parameters(text: &str, parameters: &std::collections::HashMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after.split_once('}') {
            Some((name, tail)) if parameters.contains_key(name) => {
                out.push_str(&parameters[name]);
                rest = tail;
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A `!Ref X` / `!GetAtt X.Arn` (short or long form) reference's logical id.
fn reference(v: &Value) -> Option<String> {
    if let Value::Tagged(t) = v {
        let target = t.value.as_str()?;
        return Some(target.split('.').next()?.to_owned());
    }
    let m = v.as_mapping()?;
    if let Some(r) = m.get("Ref").and_then(Value::as_str) {
        return Some(r.to_owned());
    }
    match m.get("Fn::GetAtt")? {
        Value::Sequence(s) => s.first()?.as_str().map(str::to_owned),
        Value::String(s) => s.split('.').next().map(str::to_owned),
        _ => None,
    }
}

pub fn parse(text: &str) -> Result<Vec<Rule>, TemplateError> {
    rules_of(&document(text)?)
}

fn rules_of(doc: &Value) -> Result<Vec<Rule>, TemplateError> {
    let parameters = parameter_defaults(doc);
    let empty = serde_yaml_ng::Mapping::new();
    let resources = doc.get("Resources").and_then(Value::as_mapping).unwrap_or(&empty);
    let typed = |ty: &'static str| {
        resources
            .iter()
            .filter(move |(_, r)| r.get("Type").and_then(Value::as_str) == Some(ty))
            .filter_map(|(id, r)| Some((id.as_str()?.to_owned(), r)))
    };
    // queue logical id -> (function logical id, batch size, maximum concurrency)
    let consumers: Vec<(String, String, usize, usize)> = typed("AWS::Serverless::Function")
        .flat_map(|(function, r)| {
            let events =
                r.get("Properties").and_then(|p| p.get("Events")).and_then(Value::as_mapping).cloned();
            events.unwrap_or_default().into_iter().filter_map(move |(_, e)| {
                if e.get("Type").and_then(Value::as_str) != Some("SQS") {
                    return None;
                }
                let props = e.get("Properties")?;
                let queue = reference(props.get("Queue")?)?;
                let batch = props.get("BatchSize").and_then(Value::as_u64).unwrap_or(10) as usize;
                let concurrency = props
                    .get("ScalingConfig")
                    .and_then(|c| c.get("MaximumConcurrency"))
                    .and_then(Value::as_u64)
                    .unwrap_or(5) as usize;
                Some((queue, function.clone(), batch, concurrency))
            })
        })
        .collect();

    let mut rules = Vec::new();
    for (id, r) in typed("AWS::IoT::TopicRule") {
        let fail = |problem: String| TemplateError::Rule { rule: id.clone(), problem };
        let payload = r
            .get("Properties")
            .and_then(|p| p.get("TopicRulePayload"))
            .ok_or_else(|| fail("no TopicRulePayload".into()))?;
        if payload.get("RuleDisabled").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        match payload.get("AwsIotSqlVersion").and_then(Value::as_str) {
            Some("2016-03-23") => {}
            other => {
                return Err(fail(format!("AwsIotSqlVersion {other:?} (only \"2016-03-23\" is supported)")))
            }
        }
        let sql_text = payload.get("Sql").and_then(Value::as_str).ok_or_else(|| fail("no Sql".into()))?;
        let statement = sql::parse(sql_text).map_err(|e| fail(e.to_string()))?;
        let actions =
            payload.get("Actions").and_then(Value::as_sequence).ok_or_else(|| fail("no Actions".into()))?;
        let mut targets = Vec::new();
        for action in actions {
            let Some((kind, body)) = action.as_mapping().and_then(|m| m.iter().next()) else {
                return Err(fail("an empty action".into()));
            };
            let kind = kind.as_str().unwrap_or_default();
            match kind {
                "Sqs" => {
                    let queue = body
                        .get("QueueUrl")
                        .and_then(reference)
                        .ok_or_else(|| fail("Sqs action without a !Ref QueueUrl".into()))?;
                    let (_, function, batch_size, max_concurrency) = consumers
                        .iter()
                        .find(|(q, _, _, _)| *q == queue)
                        .ok_or_else(|| fail(format!("queue {queue} has no consuming function")))?;
                    targets.push(Target::Queue {
                        queue,
                        function: function.clone(),
                        batch_size: *batch_size,
                        max_concurrency: *max_concurrency,
                    });
                }
                "Lambda" => {
                    let function = body
                        .get("FunctionArn")
                        .and_then(reference)
                        .ok_or_else(|| fail("Lambda action without a !GetAtt FunctionArn".into()))?;
                    targets.push(Target::Function { function });
                }
                other => return Err(fail(format!("action {other} is not supported locally (Sqs, Lambda)"))),
            }
        }
        let deployed_name = r
            .get("Properties")
            .and_then(|p| p.get("RuleName"))
            .and_then(policy::sub_string)
            .map(|n| with_parameters(n, &parameters))
            .unwrap_or_else(|| id.clone());
        rules.push(Rule { name: id, deployed_name, sql: sql_text.to_owned(), statement, targets });
    }
    rules.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = include_str!("../../infra/template.yaml");

    #[test]
    fn reads_the_deployed_rules_and_their_consumers() -> Result<(), TemplateError> {
        let rules = parse(TEMPLATE)?;
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "CommandAckRule",
                "OtaInstallFailedRule",
                "OtaJobCompletedRule",
                "PresenceRule",
                "TelemetryTopicRule",
                "TwinDeleteRule",
                "TwinDocumentsRule",
                "TwinNamedDeleteRule",
                "TwinNamedDocumentsRule"
            ]
        );
        assert_eq!(rules[0].targets, vec![Target::Function { function: "CommandAckFunction".into() }]);
        for ota in &rules[1..3] {
            assert_eq!(ota.targets, vec![Target::Function { function: "OtaOrchestratorFunction".into() }]);
        }
        let rules = &rules[3..];
        assert_eq!(
            rules[0].targets,
            vec![Target::Queue {
                queue: "PresenceEventsQueue".into(),
                function: "PresenceFunction".into(),
                batch_size: 100,
                max_concurrency: 5
            }]
        );
        for twin_rule in &rules[2..] {
            assert_eq!(
                twin_rule.targets,
                vec![Target::Queue {
                    queue: "TwinEventsQueue".into(),
                    function: "TwinSyncFunction".into(),
                    batch_size: 100,
                    max_concurrency: 5
                }]
            );
        }
        assert_eq!(
            rules[1].targets,
            vec![Target::Queue {
                queue: "TelemetryQueue".into(),
                function: "IngestTelemetryFunction".into(),
                batch_size: 1000,
                max_concurrency: 10
            }]
        );
        Ok(())
    }

    fn one_rule(sql: &str, action: &str) -> String {
        format!(
            "Resources:\n  R:\n    Type: AWS::IoT::TopicRule\n    Properties:\n      TopicRulePayload:\n        AwsIotSqlVersion: '2016-03-23'\n        Sql: \"{sql}\"\n        Actions:\n          - {action}\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n      Events:\n        Q:\n          Type: SQS\n          Properties:\n            Queue: !GetAtt Q.Arn\n"
        )
    }

    #[test]
    fn fails_naming_the_rule_and_the_unsupported_construct() {
        let err = parse(&one_rule("SELECT upper(x) AS y FROM 'a'", "Sqs: { QueueUrl: !Ref Q }")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "topic rule R: unsupported or invalid rule SQL: function upper() (at character 7)"
        );
        let err = parse(&one_rule("SELECT * FROM 'a'", "Republish: { Topic: x }")).unwrap_err();
        assert!(err.to_string().contains("action Republish is not supported locally"), "{err}");
        let err = parse(&one_rule("SELECT * FROM 'a'", "Sqs: { QueueUrl: !Ref Other }")).unwrap_err();
        assert!(err.to_string().contains("queue Other has no consuming function"), "{err}");
    }

    #[test]
    fn reads_schedules_and_rejects_what_it_cannot_time() -> Result<(), TemplateError> {
        let ours = schedules(TEMPLATE)?;
        let ours: Vec<(&str, u64)> = ours.iter().map(|s| (s.function.as_str(), s.every.as_secs())).collect();
        assert_eq!(
            ours,
            [
                ("TwinSyncFunction", 300),
                ("CertExpiryCheckFunction", 86_400),
                ("CertExpiryCheckFunction", 3_600),
                ("OtaOrchestratorFunction", 300),
                ("FleetHealthFunction", 60)
            ],
            "the template's schedules"
        );
        let reconcile = schedules(TEMPLATE)?.into_iter().find_map(|s| s.input);
        assert_eq!(reconcile, Some(serde_json::json!({"task": "reconcile"})));
        let bad = "Resources:\n  F:\n    Type: AWS::Serverless::Function\n    Properties:\n      Events:\n        T:\n          Type: Schedule\n          Properties:\n            Schedule: rate(1 hour)\n            Input: '{not json'\n";
        assert!(schedules(bad).unwrap_err().to_string().contains("Input is not JSON"));
        let t = "Resources:\n  HealthFunction:\n    Type: AWS::Serverless::Function\n    Properties:\n      Events:\n        Tick:\n          Type: Schedule\n          Properties:\n            Schedule: rate(5 minutes)\n";
        let s = schedules(t)?;
        assert_eq!((s[0].function.as_str(), s[0].every.as_secs()), ("HealthFunction", 300));
        let err = schedules(&t.replace("rate(5 minutes)", "cron(0 12 * * ? *)")).unwrap_err();
        assert!(err.to_string().contains("not supported locally"), "{err}");
        assert_eq!(parse_rate("rate(1 day)").map(|d| d.as_secs()), Ok(86_400));
        assert!(parse_rate("rate(0 minutes)").is_err() && parse_rate("rate(2 weeks)").is_err());
        Ok(())
    }

    #[test]
    fn resolves_lambda_actions_and_default_batch_size() -> Result<(), TemplateError> {
        let rules = parse(&one_rule("SELECT * FROM 'a'", "Lambda: { FunctionArn: !GetAtt F.Arn }"))?;
        assert_eq!(rules[0].targets, vec![Target::Function { function: "F".into() }]);
        let rules = parse(&one_rule("SELECT * FROM 'a'", "Sqs: { QueueUrl: { Ref: Q } }"))?;
        assert_eq!(
            rules[0].targets,
            vec![Target::Queue {
                queue: "Q".into(),
                function: "F".into(),
                batch_size: 10,
                max_concurrency: 5
            }]
        );
        Ok(())
    }
}
