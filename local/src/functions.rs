//! Functions by name: the one interface the local IoT Core calls them through. As with
//! Lambda's Invoke API, a function is its SAM logical id, a JSON event goes in and a JSON
//! response (or an error with a type) comes out; the rules engine, the queues and the timers
//! know nothing else about it. [`crate::catalog`] says which handler runs for which name.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fleet_shared::lambda::ErrorType;
use lambda_runtime::{Context as LambdaContext, LambdaEvent};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

pub type Invocation = Pin<Box<dyn Future<Output = Result<Value, FunctionError>> + Send>>;

/// What Lambda reports for a failed invocation: `errorType` and `errorMessage`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct FunctionError {
    pub error_type: String,
    pub message: String,
}

impl FunctionError {
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        FunctionError { error_type: error_type.into(), message: message.into() }
    }
}

/// A function the local IoT Core can invoke.
pub trait LocalFunction: Send + Sync {
    fn invoke(&self, event: Box<RawValue>) -> Invocation;
}

impl<F> LocalFunction for F
where
    F: Fn(Box<RawValue>) -> Invocation + Send + Sync,
{
    fn invoke(&self, event: Box<RawValue>) -> Invocation {
        self(event)
    }
}

/// A Lambda handler (`async fn(&Deps, LambdaEvent<Box<RawValue>>) -> Result<R, E>`) as a
/// [`LocalFunction`]: its response serialised, its error typed as Lambda types it.
pub fn lambda<D, R, E, H, Fut>(deps: Arc<D>, handler: H) -> impl LocalFunction
where
    D: Send + Sync + 'static,
    R: Serialize,
    E: ErrorType,
    H: Fn(Arc<D>, LambdaEvent<Box<RawValue>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
{
    move |event: Box<RawValue>| -> Invocation {
        let running = handler(Arc::clone(&deps), LambdaEvent::new(event, LambdaContext::default()));
        Box::pin(async move {
            let response = running.await.map_err(|e| FunctionError::new(e.error_type(), e.to_string()))?;
            serde_json::to_value(response).map_err(|e| FunctionError::new("ResponseNotJson", e.to_string()))
        })
    }
}

/// The functions of one local IoT Core, by SAM logical id.
#[derive(Default, Clone)]
pub struct Functions {
    by_name: BTreeMap<String, Arc<dyn LocalFunction>>,
}

impl Functions {
    pub fn add(&mut self, name: &str, function: impl LocalFunction + 'static) -> &mut Self {
        self.by_name.insert(name.to_owned(), Arc::new(function));
        self
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Invoke `name` with `event` (serialised to JSON first, as Lambda receives it).
    pub async fn invoke(&self, name: &str, event: &impl Serialize) -> Result<Value, FunctionError> {
        let raw = serde_json::value::to_raw_value(event)
            .map_err(|e| FunctionError::new("InvalidRequestContent", e.to_string()))?;
        self.invoke_raw(name, raw).await
    }

    /// Invoke `name` with an event that is JSON already. A panic in the handler is an error
    /// (`Runtime.Panic`), as Lambda reports one, so every caller retries it as it would.
    pub async fn invoke_raw(&self, name: &str, event: Box<RawValue>) -> Result<Value, FunctionError> {
        let function = self
            .by_name
            .get(name)
            .ok_or_else(|| FunctionError::new("ResourceNotFound", format!("no local function {name}")))?;
        tokio::spawn(function.invoke(event))
            .await
            .map_err(|e| FunctionError::new("Runtime.Panic", e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("no")]
    struct No;
    impl ErrorType for No {
        fn error_type(&self) -> &'static str {
            "Refused"
        }
    }

    #[tokio::test]
    async fn invokes_by_name_with_json_in_and_out() {
        let mut functions = Functions::default();
        functions.add(
            "Echo",
            lambda(Arc::new(2), |k: Arc<i32>, e: LambdaEvent<Box<RawValue>>| async move {
                let v: Value = serde_json::from_str(e.payload.get()).map_err(|_| No)?;
                if v["refuse"] == true {
                    return Err(No);
                }
                Ok(serde_json::json!({ "times": *k, "got": v }))
            }),
        );
        let out = functions.invoke("Echo", &serde_json::json!({ "a": 1 })).await;
        assert_eq!(out, Ok(serde_json::json!({ "times": 2, "got": { "a": 1 } })));
        let err = functions.invoke("Echo", &serde_json::json!({ "refuse": true })).await;
        assert_eq!(err, Err(FunctionError::new("Refused", "no")));
        let err = functions.invoke("Nope", &1).await.unwrap_err();
        assert_eq!(err.error_type, "ResourceNotFound");
        functions.add("Panics", |_: Box<RawValue>| -> Invocation { Box::pin(async { panic!("bug") }) });
        let err = functions.invoke("Panics", &1).await.unwrap_err();
        assert_eq!(err.error_type, "Runtime.Panic");
    }
}
