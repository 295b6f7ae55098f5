//! [`IotControlPlane`]: AWS IoT's certificate registry (the control plane's REST API), for
//! reconciliation ([`CertificateRegistry`]) and decommissioning ([`CertificateControl`]).
//!
//! Five calls, signed with SigV4 (`aws-sigv4`, service `iot`) and sent on the SDK's own HTTPS
//! connector (`aws-smithy-http-client`, rustls), with the credentials and region of the one
//! `SdkConfig` the process loaded. Not `aws-sdk-iot`: that crate is 2.5 MB of source for some
//! 300 operations (2.7 times `aws-sdk-dynamodb`), and every clippy, test and release build
//! would compile it for these five. The wire format is the documented REST-JSON one:
//!
//! | call | request |
//! |---|---|
//! | ListCertificates | `GET /certificates?pageSize=&marker=&isAscendingOrder=true` |
//! | DescribeCertificate | `GET /certificates/<id>` |
//! | ListPrincipalThings | `GET /principals/things?maxResults=&nextToken=`, header `x-amzn-principal` |
//! | ListThingPrincipals | `GET /things/<thing>/principals?maxResults=&nextToken=` |
//! | UpdateCertificate | `PUT /certificates/<id>?newStatus=` |
//!
//! Throttling (429, `ThrottlingException`), 5xx and connection failures are
//! [`Transient`](crate::error::ErrorKind::Transient); the caller backs off (reconciliation does,
//! with bounded concurrency). Each call has a deadline. The endpoint is
//! `AWS_ENDPOINT_URL_IOT`, else the config's endpoint URL (moto in tests), else
//! `https://iot.<region>.amazonaws.com`.

use aws_config::SdkConfig;
use serde::Deserialize;

#[cfg(test)]
use super::signed::api_error;
use super::signed::{percent as encode, ApiError, SignedClient};

use crate::error::StoreError;
use crate::model::{
    CertStatus, CertificateDetail, CertificateId, CertificatePage, RegisteredCertificate, ThingName,
};
use crate::ports::{CertificateControl, CertificateRegistry};

/// The most certificates ListCertificates returns per page.
pub const MAX_PAGE_SIZE: usize = 250;
/// The most things / principals one ListPrincipalThings / ListThingPrincipals page holds.
const MAX_RESULTS: usize = 250;

/// AWS IoT's control plane, for the certificate registry.
pub struct IotControlPlane {
    client: SignedClient,
}

/// What AWS IoT answered, when it was not a success.
pub type IotApiError = ApiError;

impl IotControlPlane {
    /// From the process's `SdkConfig`: its credentials, region and endpoint override.
    pub fn new(sdk: &SdkConfig) -> Result<Self, crate::ConfigError> {
        Ok(Self { client: SignedClient::new(sdk, "iot", "AWS_ENDPOINT_URL_IOT", "iot")? })
    }

    /// Against a given endpoint (tests: a scripted server).
    pub fn with_endpoint(
        endpoint: impl Into<String>,
        region: impl Into<String>,
        credentials: aws_credential_types::provider::SharedCredentialsProvider,
    ) -> Self {
        Self { client: SignedClient::with_endpoint("iot", endpoint, region, credentials) }
    }

    async fn call(
        &self,
        op: &'static str,
        method: &str,
        path_and_query: &str,
        headers: &[(&'static str, &str)],
        body: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.client.call(op, method, path_and_query, headers, body).await
    }

    /// The account's iot-data (ATS) endpoint, `https://<prefix>-ats.iot.<region>.amazonaws.com`
    /// (DescribeEndpoint, `iot:DescribeEndpoint`).
    pub async fn data_endpoint(&self) -> Result<String, StoreError> {
        const OP: &str = "iot describe endpoint";
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Endpoint {
            endpoint_address: String,
        }
        let body = self.call(OP, "GET", "/endpoint?endpointType=iot%3AData-ATS", &[], b"").await?;
        let e: Endpoint = decode(OP, &body)?;
        Ok(format!("https://{}", e.endpoint_address))
    }
}

fn decode<T: serde::de::DeserializeOwned>(op: &'static str, body: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(body).map_err(|e| StoreError::permanent(op, e))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Listed {
    certificate_arn: String,
    certificate_id: String,
    status: String,
    /// Epoch seconds (REST-JSON timestamps).
    creation_date: Option<f64>,
}

impl Listed {
    fn into_domain(self, op: &'static str) -> Result<RegisteredCertificate, StoreError> {
        Ok(RegisteredCertificate {
            id: CertificateId::parse(&self.certificate_id).map_err(|e| StoreError::permanent(op, e))?,
            status: CertStatus::parse(&self.status).ok_or_else(|| {
                StoreError::permanent(op, format!("unknown certificate status {:?}", self.status))
            })?,
            arn: self.certificate_arn,
            created_ms: self.creation_date.map_or(0, |s| (s * 1000.0) as i64),
        })
    }
}

impl CertificateRegistry for IotControlPlane {
    async fn list_certificates(
        &self,
        marker: Option<&str>,
        page_size: usize,
    ) -> Result<CertificatePage, StoreError> {
        const OP: &str = "iot ListCertificates";
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Page {
            #[serde(default)]
            certificates: Vec<Listed>,
            next_marker: Option<String>,
        }
        let mut path =
            format!("/certificates?isAscendingOrder=true&pageSize={}", page_size.clamp(1, MAX_PAGE_SIZE));
        if let Some(marker) = marker {
            path.push_str(&format!("&marker={}", encode(marker)));
        }
        let page: Page = decode(OP, &self.call(OP, "GET", &path, &[], &[]).await?)?;
        Ok(CertificatePage {
            certificates: page
                .certificates
                .into_iter()
                .map(|c| c.into_domain(OP))
                .collect::<Result<_, _>>()?,
            next: page.next_marker.filter(|m| !m.is_empty()),
        })
    }

    async fn describe_certificate(
        &self,
        id: &CertificateId,
    ) -> Result<Option<CertificateDetail>, StoreError> {
        const OP: &str = "iot DescribeCertificate";
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Described {
            certificate_description: Description,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Description {
            #[serde(flatten)]
            listed: Listed,
            certificate_pem: String,
        }
        let body = match self.call(OP, "GET", &format!("/certificates/{id}"), &[], &[]).await {
            Ok(body) => body,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let d: Described = decode(OP, &body)?;
        let d = d.certificate_description;
        Ok(Some(CertificateDetail { listed: d.listed.into_domain(OP)?, pem: d.certificate_pem }))
    }

    async fn certificate_things(&self, arn: &str) -> Result<Vec<ThingName>, StoreError> {
        const OP: &str = "iot ListPrincipalThings";
        let names = self.all_pages(OP, "/principals/things", &[("x-amzn-principal", arn)], "things").await?;
        names.iter().map(|n| ThingName::parse(n).map_err(|e| StoreError::permanent(OP, e))).collect()
    }

    async fn thing_certificates(&self, thing: &ThingName) -> Result<Vec<CertificateId>, StoreError> {
        const OP: &str = "iot ListThingPrincipals";
        let path = format!("/things/{}/principals", encode(thing.as_str()));
        let principals = self.all_pages(OP, &path, &[], "principals").await?;
        // Principals are certificate ARNs (`…:cert/<id>`) or others (Cognito ids): only
        // certificates are kept.
        Ok(principals.iter().filter_map(|p| CertificateId::of_arn(p)).collect())
    }
}

impl IotControlPlane {
    /// Every page of a list call that pages with `maxResults` / `nextToken`: the strings of
    /// the answer's `field`.
    async fn all_pages(
        &self,
        op: &'static str,
        path: &str,
        headers: &[(&'static str, &str)],
        field: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!("{path}?maxResults={MAX_RESULTS}");
            if let Some(t) = &token {
                url.push_str(&format!("&nextToken={}", encode(t)));
            }
            let mut page: serde_json::Value = decode(op, &self.call(op, "GET", &url, headers, &[]).await?)?;
            match page.get_mut(field).map(serde_json::Value::take) {
                None | Some(serde_json::Value::Null) => {}
                Some(items) => {
                    let items: Vec<String> =
                        serde_json::from_value(items).map_err(|e| StoreError::permanent(op, e))?;
                    out.extend(items);
                }
            }
            match page.get("nextToken").and_then(serde_json::Value::as_str).filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t.to_owned()),
                None => return Ok(out),
            }
        }
    }
}

impl CertificateControl for IotControlPlane {
    async fn set_certificate_status(&self, id: &CertificateId, status: CertStatus) -> Result<(), StoreError> {
        const OP: &str = "iot UpdateCertificate";
        self.call(OP, "PUT", &format!("/certificates/{id}?newStatus={}", status.as_str()), &[], &[])
            .await
            .map(drop)
    }
}

/// What tests put in a registry (moto) before reconciling it: certificates registered without a
/// CA, things, attachments. Not used by any function.
#[cfg(feature = "test-support")]
impl IotControlPlane {
    /// RegisterCertificateWithoutCA: the certificate's id.
    pub async fn register_certificate(
        &self,
        pem: &str,
        status: CertStatus,
    ) -> Result<CertificateId, StoreError> {
        const OP: &str = "iot RegisterCertificateWithoutCA";
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Registered {
            certificate_id: String,
        }
        let body = serde_json::json!({ "certificatePem": pem, "status": status.as_str() }).to_string();
        let r: Registered =
            decode(OP, &self.call(OP, "POST", "/certificate/register-no-ca", &[], body.as_bytes()).await?)?;
        CertificateId::parse(&r.certificate_id).map_err(|e| StoreError::permanent(OP, e))
    }

    /// CreateThing.
    pub async fn create_thing(&self, thing: &ThingName) -> Result<(), StoreError> {
        const OP: &str = "iot CreateThing";
        self.call(OP, "POST", &format!("/things/{}", encode(thing.as_str())), &[], b"{}").await.map(drop)
    }

    /// AttachThingPrincipal.
    pub async fn attach(&self, thing: &ThingName, arn: &str) -> Result<(), StoreError> {
        const OP: &str = "iot AttachThingPrincipal";
        let path = format!("/things/{}/principals", encode(thing.as_str()));
        self.call(OP, "PUT", &path, &[("x-amzn-principal", arn)], &[]).await.map(drop)
    }
}

fn not_found(e: &StoreError) -> bool {
    e.source
        .downcast_ref::<IotApiError>()
        .is_some_and(|a| a.status == 404 || a.code == "ResourceNotFoundException")
}

#[cfg(test)]
mod tests {

    use aws_credential_types::provider::SharedCredentialsProvider;
    use aws_credential_types::Credentials;

    use super::*;
    use crate::adapters::aws::scripted::Scripted;

    fn plane(url: &str) -> IotControlPlane {
        let creds = Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
        IotControlPlane::with_endpoint(url, "eu-west-1", SharedCredentialsProvider::new(creds))
    }

    const PAGE_1: &str = r#"{"certificates":[{"certificateArn":"arn:aws:iot:eu-west-1:123456789012:cert/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","certificateId":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","status":"ACTIVE","creationDate":1764000000.5}],"nextMarker":"m/2+"}"#;
    const PAGE_2: &str = r#"{"certificates":[{"certificateArn":"arn:aws:iot:eu-west-1:123456789012:cert/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","certificateId":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","status":"REVOKED","creationDate":1764000001}]}"#;

    #[tokio::test]
    async fn pages_follow_the_marker_throttling_is_transient_and_every_call_is_signed() {
        let server = Scripted::start(vec![
            (400, r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#),
            (200, PAGE_1),
            (200, PAGE_2),
            (403, r#"{"__type":"AccessDeniedException","message":"not allowed"}"#),
        ])
        .await;
        let iot = plane(&server.url);

        let throttled = iot.list_certificates(None, 1).await.expect_err("throttled");
        assert!(throttled.is_transient(), "{throttled}");
        let first = iot.list_certificates(None, 1).await.expect("page 1");
        assert_eq!(first.certificates[0].created_ms, 1_764_000_000_500);
        assert_eq!(first.next.as_deref(), Some("m/2+"));
        let second = iot.list_certificates(first.next.as_deref(), 1).await.expect("page 2");
        assert_eq!((second.certificates[0].status, second.next), (CertStatus::Revoked, None));
        let denied = iot.list_certificates(None, 1).await.expect_err("denied");
        assert!(!denied.is_transient() && denied.to_string().contains("AccessDeniedException"), "{denied}");

        let seen = server.heads();
        assert_eq!(seen.len(), 4);
        assert!(
            seen[2].starts_with("get /certificates?isascendingorder=true&pagesize=1&marker=m%2f2%2b "),
            "{}",
            seen[2]
        );
        for request in &seen {
            assert!(
                request.contains("authorization: aws4-hmac-sha256 credential=akidexample/")
                    && request.contains("/eu-west-1/iot/aws4_request"),
                "unsigned: {request}"
            );
        }
    }

    #[tokio::test]
    async fn a_missing_certificate_is_none_and_other_principals_are_not_certificates() {
        let id = "c".repeat(64);
        let principals: &'static str = Box::leak(
            format!(r#"{{"principals":["arn:aws:iot:eu-west-1:1:cert/{id}","eu-west-1:cognito-id"],"nextToken":"t"}}"#)
                .into_boxed_str(),
        );
        let server = Scripted::start(vec![
            (404, r#"{"__type":"ResourceNotFoundException","message":"gone"}"#),
            (200, principals),
            (200, r#"{"principals":[]}"#),
        ])
        .await;
        let iot = plane(&server.url);
        assert_eq!(
            iot.describe_certificate(&CertificateId::parse(&id).unwrap()).await.expect("answer"),
            None
        );
        let ids = iot.thing_certificates(&ThingName::parse("sensor-1").unwrap()).await.expect("principals");
        assert_eq!(ids, vec![CertificateId::parse(&id).unwrap()]);
        let seen = server.heads();
        assert!(
            seen[2].starts_with("get /things/sensor-1/principals?maxresults=250&nexttoken=t "),
            "{}",
            seen[2]
        );
    }

    #[test]
    fn errors_name_what_aws_said_and_whether_a_retry_can_help() {
        let throttled =
            api_error(400, None, br#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#);
        assert_eq!((throttled.code.as_str(), throttled.is_transient()), ("ThrottlingException", true));
        assert!(api_error(429, None, b"").is_transient());
        assert!(api_error(503, None, b"<html>").is_transient());
        let missing = api_error(404, None, br#"{"message":"no such certificate"}"#);
        assert_eq!((missing.code.as_str(), missing.is_transient()), ("ResourceNotFoundException", false));
        let denied = api_error(403, None, br#"{"__type":"com.amazon#AccessDeniedException","message":"no"}"#);
        assert_eq!((denied.code.as_str(), denied.is_transient()), ("AccessDeniedException", false));
        let coral =
            api_error(400, None, br#"{"__type":"ThrottlingException:http://internal.amazon.com/coral/"}"#);
        assert_eq!((coral.code.as_str(), coral.is_transient()), ("ThrottlingException", true));
        // The x-amzn-ErrorType header wins over the body (AWS IoT sends both).
        let header = api_error(
            400,
            Some("ThrottlingException:http://internal.amazon.com/coral/com.amazonaws.iot/"),
            br#"{"message":"Rate exceeded for account"}"#,
        );
        assert_eq!(
            (header.code.as_str(), header.message.as_str(), header.is_transient()),
            ("ThrottlingException", "Rate exceeded for account", true)
        );
        let conflict = api_error(409, Some("ResourceAlreadyExistsException"), br#"{"code":"Other"}"#);
        assert_eq!(conflict.code, "ResourceAlreadyExistsException");
    }

    #[test]
    fn markers_and_names_are_encoded_for_the_query() {
        assert_eq!(encode("a+b/c=="), "a%2Bb%2Fc%3D%3D");
        assert_eq!(encode("thing_1-a.b~"), "thing_1-a.b~");
    }

    #[test]
    fn only_certificate_principals_are_certificates() {
        let id = "a".repeat(64);
        assert_eq!(
            CertificateId::of_arn(&format!("arn:aws:iot:us-east-1:123456789012:cert/{id}")),
            Some(CertificateId::parse(&id).unwrap())
        );
        assert_eq!(CertificateId::of_arn("us-east-1:11111111-2222-3333-4444-555555555555"), None);
    }
}
