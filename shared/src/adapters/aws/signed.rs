//! [`SignedClient`]: a few calls to an AWS API without its SDK crate, signed with SigV4
//! (`aws-sigv4`) and sent on the SDK's own HTTPS connector (`aws-smithy-http-client`, rustls),
//! with the credentials and region of the one `SdkConfig` the process loaded. For services
//! whose SDK crate would be compiled for one or two calls: AWS IoT's certificate registry
//! ([`super::IotControlPlane`]), SSM's GetParameter (the command signing key,
//! [`super::SsmParameter`]), Lambda's Invoke (`fleetctl command send`, [`super::LambdaInvoker`]).
//!
//! Throttling (429, `Throttling*`), 5xx and connection failures are
//! [`Transient`](crate::error::ErrorKind::Transient); each call has a deadline. The endpoint is
//! the service's `AWS_ENDPOINT_URL_<SERVICE>`, else the config's endpoint URL (moto, the local
//! stack), else `https://<host>.<region>.amazonaws.com`.

use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use aws_smithy_http_client::Connector;
use aws_smithy_runtime_api::client::http::HttpConnector;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::byte_stream::ByteStream;
use serde::Deserialize;

use crate::error::StoreError;

/// One call's deadline (connect, send, read the whole answer).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Signed calls to one AWS service.
pub struct SignedClient {
    connector: Connector,
    /// One call's deadline.
    timeout: Duration,
    /// The SigV4 signing name (`iot`, `ssm`, `lambda`).
    service: &'static str,
    endpoint: String,
    region: String,
    credentials: aws_credential_types::provider::SharedCredentialsProvider,
}

/// What an AWS API answered, when it was not a success.
#[derive(Debug, thiserror::Error)]
#[error("AWS answered {status} {code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub(crate) fn is_transient(&self) -> bool {
        self.status == 429
            || self.status >= 500
            || matches!(
                self.code.as_str(),
                "ThrottlingException" | "ServiceUnavailableException" | "TooManyRequestsException"
            )
    }
}

impl SignedClient {
    /// From the process's `SdkConfig`: its credentials, region and endpoint override
    /// (`endpoint_var`, else the config's); else `https://<host>.<region>.amazonaws.com`.
    pub fn new(
        sdk: &SdkConfig,
        service: &'static str,
        endpoint_var: &str,
        host: &str,
    ) -> Result<Self, crate::ConfigError> {
        let region =
            sdk.region().map(ToString::to_string).ok_or(crate::ConfigError::Missing("AWS_REGION"))?;
        let credentials =
            sdk.credentials_provider().ok_or(crate::ConfigError::Missing("AWS_ACCESS_KEY_ID"))?;
        let endpoint = std::env::var(endpoint_var)
            .ok()
            .or_else(|| sdk.endpoint_url().map(ToOwned::to_owned))
            .unwrap_or_else(|| format!("https://{host}.{region}.amazonaws.com"));
        Ok(Self::with_endpoint(service, endpoint, region, credentials))
    }

    /// Against a given endpoint (tests: a scripted server).
    pub fn with_endpoint(
        service: &'static str,
        endpoint: impl Into<String>,
        region: impl Into<String>,
        credentials: aws_credential_types::provider::SharedCredentialsProvider,
    ) -> Self {
        Self {
            connector: Connector::builder().tls_provider(Provider::Rustls(CryptoMode::AwsLc)).build(),
            timeout: CALL_TIMEOUT,
            service,
            endpoint: endpoint.into().trim_end_matches('/').to_owned(),
            region: region.into(),
            credentials,
        }
    }

    /// With another deadline per call (a synchronous Lambda invocation may take the function's
    /// whole timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// One signed call; the answer's body on 2xx, a typed error otherwise. A body is sent as
    /// `application/json` unless `headers` name another content type.
    pub async fn call(
        &self,
        op: &'static str,
        method: &str,
        path_and_query: &str,
        headers: &[(&'static str, &str)],
        body: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let answer = tokio::time::timeout(self.timeout, self.send(op, method, path_and_query, headers, body))
            .await
            .map_err(|_| StoreError::transient(op, format!("no answer within {:?}", self.timeout)))??;
        let (status, error_type, body) = answer;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let error = api_error(status, error_type.as_deref(), &body);
        Err(if error.is_transient() {
            StoreError::transient(op, error)
        } else {
            StoreError::permanent(op, error)
        })
    }

    async fn send(
        &self,
        op: &'static str,
        method: &str,
        path_and_query: &str,
        headers: &[(&'static str, &str)],
        body: &[u8],
    ) -> Result<(u16, Option<String>, Vec<u8>), StoreError> {
        let credentials =
            self.credentials.provide_credentials().await.map_err(|e| StoreError::permanent(op, e))?;
        let identity = Identity::from(credentials);
        let uri = format!("{}{}", self.endpoint, path_and_query);
        let host = uri
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(rest))
            .unwrap_or_default()
            .to_owned();
        let mut request = http::Request::builder().method(method).uri(&uri).header("host", &host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if !body.is_empty() && !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-type")) {
            request = request.header("content-type", "application/json");
        }
        let mut request =
            request.body(SdkBody::from(body.to_vec())).map_err(|e| StoreError::permanent(op, e))?;

        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(self.service)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| StoreError::permanent(op, e))?
            .into();
        let signable = SignableRequest::new(
            method,
            uri.as_str(),
            request.headers().iter().filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
            SignableBody::Bytes(body),
        )
        .map_err(|e| StoreError::permanent(op, e))?;
        let (instructions, _signature) =
            sign(signable, &params).map_err(|e| StoreError::permanent(op, e))?.into_parts();
        instructions.apply_to_request_http1x(&mut request);

        let request = HttpRequest::try_from(request).map_err(|e| StoreError::permanent(op, e))?;
        let response = self.connector.call(request).await.map_err(|e| StoreError::transient(op, e))?;
        let status = response.status().as_u16();
        let error_type = response.headers().get("x-amzn-errortype").map(str::to_owned);
        let body = ByteStream::new(response.into_body())
            .collect()
            .await
            .map_err(|e| StoreError::transient(op, e))?
            .into_bytes()
            .to_vec();
        Ok((status, error_type, body))
    }
}

/// The error in an AWS answer: its code from the `x-amzn-ErrorType` header (`error_type`),
/// which the REST-JSON services (AWS IoT among them) send and which wins, else from the body's
/// `__type` or `code`; and its message.
pub(crate) fn api_error(status: u16, error_type: Option<&str>, body: &[u8]) -> ApiError {
    #[derive(Deserialize, Default)]
    struct Body {
        #[serde(rename = "__type", alias = "code", alias = "Code")]
        code: Option<String>,
        #[serde(alias = "Message")]
        message: Option<String>,
    }
    let parsed: Body = serde_json::from_slice(body).unwrap_or_default();
    // `ThrottlingException`, `com.amazon.coral#ThrottlingException` or
    // `ThrottlingException:http://internal.amazon.com/...`: the name alone.
    let code =
        error_type.filter(|t| !t.is_empty()).map(str::to_owned).or(parsed.code).map(|c| {
            c.split(':').next().unwrap_or_default().rsplit('#').next().unwrap_or_default().to_owned()
        });
    ApiError {
        status,
        code: code.unwrap_or_else(|| {
            match status {
                429 => "ThrottlingException",
                404 => "ResourceNotFoundException",
                _ => "UnknownError",
            }
            .to_owned()
        }),
        message: parsed.message.unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect()),
    }
}

/// SSM's GetParameter, decrypted (a SecureString): the command signing key.
pub struct SsmParameter {
    client: SignedClient,
}

impl SsmParameter {
    pub fn new(sdk: &SdkConfig) -> Result<Self, crate::ConfigError> {
        Ok(Self { client: SignedClient::new(sdk, "ssm", "AWS_ENDPOINT_URL_SSM", "ssm")? })
    }

    /// The parameter's value.
    pub async fn get(&self, name: &str) -> Result<String, StoreError> {
        const OP: &str = "ssm get parameter";
        #[derive(Deserialize)]
        struct Answer {
            #[serde(rename = "Parameter")]
            parameter: Parameter,
        }
        #[derive(Deserialize)]
        struct Parameter {
            #[serde(rename = "Value")]
            value: String,
        }
        let body = serde_json::json!({"Name": name, "WithDecryption": true}).to_string();
        let headers =
            [("x-amz-target", "AmazonSSM.GetParameter"), ("content-type", "application/x-amz-json-1.1")];
        let answer = self.client.call(OP, "POST", "/", &headers, body.as_bytes()).await?;
        let a: Answer = serde_json::from_slice(&answer).map_err(|e| StoreError::permanent(OP, e))?;
        Ok(a.parameter.value)
    }
}

/// A synchronous invocation's deadline: longer than any Fleetline function's timeout, so an
/// answer is never given up on while the function still works.
const INVOKE_TIMEOUT: Duration = Duration::from_secs(70);

/// Lambda's Invoke (request-response): how `fleetctl` asks a function to act (on AWS, and on
/// the local IoT Core, which serves the same path).
pub struct LambdaInvoker {
    client: SignedClient,
}

impl LambdaInvoker {
    pub fn new(sdk: &SdkConfig) -> Result<Self, crate::ConfigError> {
        let client = SignedClient::new(sdk, "lambda", "AWS_ENDPOINT_URL_LAMBDA", "lambda")?;
        Ok(Self { client: client.timeout(INVOKE_TIMEOUT) })
    }

    /// Against a given endpoint (the local IoT Core's HTTP API).
    pub fn with_endpoint(
        endpoint: impl Into<String>,
        region: impl Into<String>,
        credentials: aws_credential_types::provider::SharedCredentialsProvider,
    ) -> Self {
        Self {
            client: SignedClient::with_endpoint("lambda", endpoint, region, credentials)
                .timeout(INVOKE_TIMEOUT),
        }
    }

    /// Invoke `function` (name or ARN) with `payload`; its answer, or its error as a
    /// permanent error (`errorType: errorMessage`).
    pub async fn invoke(
        &self,
        function: &str,
        payload: &serde_json::Value,
    ) -> Result<serde_json::Value, StoreError> {
        const OP: &str = "lambda invoke";
        let path = format!("/2015-03-31/functions/{}/invocations", percent(function));
        let body = payload.to_string();
        let answer = self.client.call(OP, "POST", &path, &[], body.as_bytes()).await?;
        let value: serde_json::Value =
            serde_json::from_slice(&answer).map_err(|e| StoreError::permanent(OP, e))?;
        if let (Some(t), Some(m)) = (value["errorType"].as_str(), value["errorMessage"].as_str()) {
            return Err(StoreError::permanent(OP, format!("{t}: {m}")));
        }
        Ok(value)
    }
}

/// Percent-encoding of a query value or path segment (SigV4's unreserved set stays as is).
pub(crate) fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
