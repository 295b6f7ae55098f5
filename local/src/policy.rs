//! The device policy: the template's `AWS::IoT::Policy`, enforced by the local broker on every
//! connect, publish and subscribe, as IoT Core enforces it for a device's certificate.
//!
//! Evaluated as IoT Core does: an explicit `Deny` wins, then any `Allow`, otherwise denied.
//! Actions `iot:Connect`, `iot:Publish`, `iot:Subscribe`, `iot:Receive` (and `iot:*`); resources
//! are the ARN's resource part (`client/…`, `topic/…`, `topicfilter/…`) with IoT's wildcards
//! `*` (any run of characters, `/` included) and `?` (one character); MQTT's `+` and `#` are
//! ordinary characters there, as in IoT policies. Policy variables `${iot:ClientId}` and
//! `${iot:Connection.Thing.ThingName}` both stand for the client id: on the local IoT Core a
//! device's thing name is its client id (a client naming a certificate, `cert/<id>`, is let in
//! only if that certificate is attached to the thing of its client id, see [`crate::broker`]).
//! Anything else a policy uses fails at start-up, naming it.

use serde_yaml_ng::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Connect,
    Publish,
    Subscribe,
    Receive,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Connect => "iot:Connect",
            Action::Publish => "iot:Publish",
            Action::Subscribe => "iot:Subscribe",
            Action::Receive => "iot:Receive",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    AnyRun,
    AnyOne,
    ClientId,
}

#[derive(Debug, Clone, PartialEq)]
struct Statement {
    allow: bool,
    actions: Vec<String>,
    resources: Vec<Vec<Piece>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IotPolicy {
    pub name: String,
    statements: Vec<Statement>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("IoT policy {policy}: {problem}")]
pub struct PolicyError {
    pub policy: String,
    pub problem: String,
}

impl IotPolicy {
    /// May `client_id` do `action` on `resource` (`topic/dt/fleet/x/telemetry`, `client/x`, ...)?
    pub fn allows(&self, action: Action, resource: &str, client_id: &str) -> bool {
        let applies = |s: &&Statement| {
            s.actions.iter().any(|a| a == "iot:*" || a == action.name())
                && s.resources.iter().any(|r| matches(r, resource.as_bytes(), client_id.as_bytes()))
        };
        let mut applicable = self.statements.iter().filter(applies).peekable();
        applicable.peek().is_some() && self.statements.iter().filter(applies).all(|s| s.allow)
    }
}

/// IoT policy wildcard matching, with the client id substituted literally for a variable.
fn matches(pattern: &[Piece], text: &[u8], client_id: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((Piece::Text(t), rest)) => {
            text.starts_with(t.as_bytes()) && matches(rest, &text[t.len()..], client_id)
        }
        Some((Piece::ClientId, rest)) => {
            !client_id.is_empty()
                && text.starts_with(client_id)
                && matches(rest, &text[client_id.len()..], client_id)
        }
        Some((Piece::AnyOne, rest)) => !text.is_empty() && matches(rest, &text[1..], client_id),
        Some((Piece::AnyRun, rest)) => (0..=text.len()).any(|i| matches(rest, &text[i..], client_id)),
    }
}

/// A resource ARN (after `!Sub`) as pattern pieces over its resource part.
fn resource(arn: &str) -> Result<Vec<Piece>, String> {
    // arn:partition:iot:region:account:resource — the first five parts name this account, and
    // `!Sub`'s pseudo parameters (`${AWS::Region}`, ...) stand in them.
    let mut plain = arn.to_owned();
    while let Some(at) = plain.find("${AWS::") {
        let end = plain[at..].find('}').ok_or_else(|| format!("unclosed variable in {arn:?}"))?;
        plain.replace_range(at..=at + end, "local");
    }
    let part = if plain == "*" {
        "*"
    } else {
        plain.splitn(6, ':').nth(5).ok_or_else(|| format!("resource {arn:?} is not an IoT ARN"))?
    };
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = part;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("${") {
            let (var, tail) = after.split_once('}').ok_or_else(|| format!("unclosed variable in {arn:?}"))?;
            // `${!x}` is !Sub's escape for a literal `${x}`.
            match var.trim_start_matches('!') {
                "iot:ClientId" | "iot:Connection.Thing.ThingName" => {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                    pieces.push(Piece::ClientId);
                }
                other => return Err(format!("variable ${{{other}}} in a resource is not supported locally")),
            }
            rest = tail;
            continue;
        }
        match c {
            '*' | '?' => {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
                pieces.push(if c == '*' { Piece::AnyRun } else { Piece::AnyOne });
            }
            c => text.push(c),
        }
        rest = &rest[c.len_utf8()..];
    }
    pieces.push(Piece::Text(text));
    pieces.retain(|p| !matches!(p, Piece::Text(t) if t.is_empty()));
    Ok(pieces)
}

/// A string, or `!Sub` / `Fn::Sub` of one (its `${AWS::…}` parts stay, they lie in the ARN's
/// account prefix).
pub(crate) fn sub_string(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Tagged(t) if t.tag == "!Sub" => t.value.as_str(),
        Value::Mapping(m) => m.get("Fn::Sub").and_then(Value::as_str),
        _ => None,
    }
}

fn one_or_many(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Sequence(s)) => s.iter().collect(),
        Some(v) => vec![v],
        None => Vec::new(),
    }
}

/// Every `AWS::IoT::Policy` of the template, by logical id.
pub fn from_template(doc: &Value) -> Result<Vec<IotPolicy>, PolicyError> {
    let parameters = crate::template::parameter_defaults(doc);
    let mut out = Vec::new();
    let Some(resources) = doc.get("Resources").and_then(Value::as_mapping) else { return Ok(out) };
    for (id, r) in resources {
        if r.get("Type").and_then(Value::as_str) != Some("AWS::IoT::Policy") {
            continue;
        }
        let name = id.as_str().unwrap_or_default().to_owned();
        let fail = |problem: String| PolicyError { policy: name.clone(), problem };
        let document = r
            .get("Properties")
            .and_then(|p| p.get("PolicyDocument"))
            .ok_or_else(|| fail("no PolicyDocument".into()))?;
        let mut statements = Vec::new();
        for s in one_or_many(document.get("Statement")) {
            let allow = match s.get("Effect").and_then(Value::as_str) {
                Some("Allow") => true,
                Some("Deny") => false,
                other => return Err(fail(format!("Effect {other:?}"))),
            };
            if s.get("Condition").is_some() || s.get("NotResource").is_some() || s.get("NotAction").is_some()
            {
                return Err(fail("Condition, NotAction and NotResource are not supported locally".into()));
            }
            let actions = one_or_many(s.get("Action"))
                .into_iter()
                .map(|a| match a.as_str() {
                    Some(a @ ("iot:Connect" | "iot:Publish" | "iot:Subscribe" | "iot:Receive" | "iot:*")) => {
                        Ok(a.to_owned())
                    }
                    _ => Err(fail(format!(
                        "action {a:?} is not supported locally (iot:Connect, iot:Publish, iot:Subscribe, iot:Receive, iot:*)"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let resources = one_or_many(s.get("Resource"))
                .into_iter()
                .map(|r| {
                    let arn = sub_string(r).ok_or_else(|| fail(format!("resource {r:?}")))?;
                    resource(&crate::template::with_parameters(arn, &parameters)).map_err(&fail)
                })
                .collect::<Result<Vec<_>, _>>()?;
            statements.push(Statement { allow, actions, resources });
        }
        out.push(IotPolicy { name, statements });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = include_str!("../../infra/template.yaml");

    fn device_policy() -> IotPolicy {
        let doc: Value = serde_yaml_ng::from_str(TEMPLATE).expect("template parses");
        let policies = from_template(&doc).expect("policies supported locally");
        policies.into_iter().find(|p| p.name == "DevicePolicy").expect("the device policy")
    }

    #[test]
    fn a_device_publishes_and_subscribes_only_on_its_own_topics() {
        let p = device_policy();
        assert!(p.allows(Action::Connect, "client/sensor-001", "sensor-001"));
        assert!(p.allows(Action::Publish, "topic/dt/fleet/sensor-001/telemetry", "sensor-001"));
        assert!(!p.allows(Action::Publish, "topic/dt/fleet/sensor-002/telemetry", "sensor-001"));
        assert!(!p.allows(Action::Publish, "topic/dt/fleet/sensor-0011/telemetry", "sensor-001"));
        assert!(!p.allows(Action::Publish, "topic/$aws/events/presence/connected/sensor-001", "sensor-001"));
        assert!(p.allows(Action::Publish, "topic/$aws/things/sensor-001/shadow/update", "sensor-001"));
        assert!(!p.allows(Action::Publish, "topic/$aws/things/sensor-002/shadow/update", "sensor-001"));
        assert!(p.allows(
            Action::Subscribe,
            "topicfilter/$aws/things/sensor-001/shadow/update/delta",
            "sensor-001"
        ));
        assert!(!p.allows(Action::Subscribe, "topicfilter/dt/fleet/+/telemetry", "sensor-001"));
        assert!(!p.allows(Action::Subscribe, "topicfilter/#", "sensor-001"));
        assert!(!p.allows(Action::Connect, "client/", ""));
    }

    #[test]
    fn a_device_uses_only_its_own_jobs_topics() {
        let p = device_policy();
        let d = "sensor-001";
        for own in ["start-next", "get", "fw-1/update", "$next/get"] {
            assert!(p.allows(Action::Publish, &format!("topic/$aws/things/{d}/jobs/{own}"), d), "{own}");
            assert!(
                !p.allows(Action::Publish, &format!("topic/$aws/things/sensor-002/jobs/{own}"), d),
                "{own}"
            );
        }
        assert!(p.allows(Action::Subscribe, "topicfilter/$aws/things/sensor-001/jobs/notify-next", d));
        assert!(p.allows(Action::Subscribe, "topicfilter/$aws/things/sensor-001/jobs/#", d));
        assert!(!p.allows(Action::Subscribe, "topicfilter/$aws/things/sensor-002/jobs/notify-next", d));
        assert!(!p.allows(Action::Subscribe, "topicfilter/$aws/things/+/jobs/notify-next", d));
        assert!(!p.allows(Action::Subscribe, "topicfilter/$aws/events/jobExecution/+/+", d));
    }

    #[test]
    fn deny_wins_and_wildcards_follow_iot_rules() -> Result<(), PolicyError> {
        let doc: Value = serde_yaml_ng::from_str(
            "Resources:\n  P:\n    Type: AWS::IoT::Policy\n    Properties:\n      PolicyDocument:\n        Statement:\n          - Effect: Allow\n            Action: 'iot:*'\n            Resource: 'arn:aws:iot:eu-west-1:1:topic/a/?/*'\n          - Effect: Deny\n            Action: iot:Publish\n            Resource: [!Sub 'arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}:topic/a/x/secret']\n",
        )
        .expect("yaml");
        let p = &from_template(&doc)?[0];
        assert!(p.allows(Action::Publish, "topic/a/x/anything/deeper", "c"));
        assert!(!p.allows(Action::Publish, "topic/a/xy/z", "c"), "? is exactly one character");
        assert!(!p.allows(Action::Publish, "topic/a/x/secret", "c"), "an explicit deny wins");
        assert!(p.allows(Action::Receive, "topic/a/x/secret", "c"));
        let bad = doc_with("arn:aws:iot:r:a:topic/${iot:Connection.Thing.Attributes[x]}", "iot:Publish");
        assert!(from_template_text(&bad).unwrap_err().problem.contains("not supported locally"));
        let bad = doc_with("arn:aws:iot:r:a:topic/x", "iot:RetainPublish");
        assert!(
            from_template_text(&bad).unwrap_err().problem.contains("iot:RetainPublish"),
            "an unknown action is not ignored"
        );
        Ok(())
    }

    fn doc_with(resource: &str, action: &str) -> String {
        format!(
            "Resources:\n  P:\n    Type: AWS::IoT::Policy\n    Properties:\n      PolicyDocument:\n        Statement:\n          - Effect: Allow\n            Action: {action}\n            Resource: '{resource}'\n"
        )
    }

    fn from_template_text(doc: &str) -> Result<Vec<IotPolicy>, PolicyError> {
        from_template(&serde_yaml_ng::from_str(doc).expect("yaml"))
    }
}
