//! [`ShadowService`] on AWS: the Device Shadow service through iot-data (GetThingShadow,
//! UpdateThingShadow, DeleteThingShadow), for operators (`fleetctl twin set`). iot-data is served on the
//! account's own endpoint (`aws iot describe-endpoint --endpoint-type iot:Data-ATS`), read
//! from `FLEET_IOT_DATA_ENDPOINT` unless an SDK endpoint override is set (tests).

use aws_config::SdkConfig;
use aws_sdk_iotdataplane::operation::delete_thing_shadow::DeleteThingShadowError;
use aws_sdk_iotdataplane::operation::get_thing_shadow::GetThingShadowError;
use aws_sdk_iotdataplane::operation::update_thing_shadow::UpdateThingShadowError;
use aws_sdk_iotdataplane::primitives::Blob;
use serde_json::Value;

use super::{classify, endpoint_overridden};
use crate::env::{ConfigError, Env};
use crate::error::StoreError;
use crate::model::{ShadowName, ThingName};
use crate::ports::{ShadowCallError, ShadowService, ShadowState};

#[derive(Clone, Debug)]
pub struct IotDataShadows {
    client: aws_sdk_iotdataplane::Client,
}

impl IotDataShadows {
    pub fn from_env(sdk: &SdkConfig, env: &Env) -> Result<Self, ConfigError> {
        let mut config = aws_sdk_iotdataplane::config::Builder::from(sdk);
        if !endpoint_overridden(sdk, "AWS_ENDPOINT_URL_IOT_DATA_PLANE") {
            config = config.endpoint_url(env.required("FLEET_IOT_DATA_ENDPOINT")?);
        }
        Ok(Self::new(aws_sdk_iotdataplane::Client::from_conf(config.build())))
    }

    /// For a function that uses the shadow service only when the deployment names its endpoint
    /// (`FLEET_IOT_DATA_ENDPOINT` set and not empty, or an SDK endpoint override): else `None`.
    pub fn configured(sdk: &SdkConfig, env: &Env) -> Result<Option<Self>, ConfigError> {
        let named = env.optional("FLEET_IOT_DATA_ENDPOINT").is_some_and(|e| !e.trim().is_empty());
        if named || endpoint_overridden(sdk, "AWS_ENDPOINT_URL_IOT_DATA_PLANE") {
            Self::from_env(sdk, env).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Against a given iot-data endpoint (e.g. from [`super::IotControlPlane::data_endpoint`]).
    pub fn at(sdk: &SdkConfig, endpoint: &str) -> Self {
        let config = aws_sdk_iotdataplane::config::Builder::from(sdk).endpoint_url(endpoint);
        Self::new(aws_sdk_iotdataplane::Client::from_conf(config.build()))
    }

    pub fn new(client: aws_sdk_iotdataplane::Client) -> Self {
        Self { client }
    }
}

fn shadow_name(shadow: &ShadowName) -> Option<String> {
    (!shadow.is_classic()).then(|| shadow.as_str().to_owned())
}

fn json(bytes: &[u8], op: &'static str) -> Result<Value, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::permanent(op, e))
}

impl ShadowService for IotDataShadows {
    async fn get_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
    ) -> Result<Option<ShadowState>, StoreError> {
        let out = self
            .client
            .get_thing_shadow()
            .thing_name(thing.as_str())
            .set_shadow_name(shadow_name(shadow))
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e)
                if matches!(
                    e.as_service_error(),
                    Some(GetThingShadowError::ResourceNotFoundException(_))
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(classify("iot-data get shadow", e)),
        };
        let body = json(out.payload().map(Blob::as_ref).unwrap_or(b"{}"), "iot-data get shadow")?;
        Ok(Some(ShadowState::from_document(&body)))
    }

    async fn update_shadow(
        &self,
        thing: &ThingName,
        shadow: &ShadowName,
        request: &Value,
    ) -> Result<u64, ShadowCallError> {
        let out = self
            .client
            .update_thing_shadow()
            .thing_name(thing.as_str())
            .set_shadow_name(shadow_name(shadow))
            .payload(Blob::new(request.to_string()))
            .send()
            .await;
        match out {
            Ok(out) => {
                let body = json(out.payload().map(Blob::as_ref).unwrap_or(b"{}"), "iot-data update shadow")?;
                Ok(body["version"].as_u64().unwrap_or(0))
            }
            Err(e) => {
                let rejected = |code: u16| ShadowCallError::Rejected {
                    code,
                    message: e.as_service_error().map(|se| se.to_string()).unwrap_or_default(),
                };
                match e.as_service_error() {
                    Some(UpdateThingShadowError::ConflictException(_)) => Err(ShadowCallError::Conflict),
                    Some(UpdateThingShadowError::InvalidRequestException(_)) => Err(rejected(400)),
                    Some(UpdateThingShadowError::RequestEntityTooLargeException(_)) => Err(rejected(413)),
                    Some(UpdateThingShadowError::UnauthorizedException(_)) => Err(rejected(401)),
                    _ => Err(ShadowCallError::Store(classify("iot-data update shadow", e))),
                }
            }
        }
    }

    async fn delete_shadow(&self, thing: &ThingName, shadow: &ShadowName) -> Result<Option<u64>, StoreError> {
        let out = self
            .client
            .delete_thing_shadow()
            .thing_name(thing.as_str())
            .set_shadow_name(shadow_name(shadow))
            .send()
            .await;
        match out {
            Ok(out) => {
                let body = json(out.payload().as_ref(), "iot-data delete shadow")?;
                Ok(Some(body["version"].as_u64().unwrap_or(0)))
            }
            Err(e)
                if matches!(
                    e.as_service_error(),
                    Some(DeleteThingShadowError::ResourceNotFoundException(_))
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(classify("iot-data delete shadow", e)),
        }
    }
}

/// Commands go out through the same data plane: IoT Core's Publish.
impl crate::ports::CommandPublisher for IotDataShadows {
    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<(), StoreError> {
        self.client
            .publish()
            .topic(topic)
            .qos(1)
            .payload(aws_sdk_iotdataplane::primitives::Blob::new(payload.to_vec()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("iot-data publish", e))
    }
}
