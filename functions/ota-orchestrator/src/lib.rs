//! ota-orchestrator as a library: the handler the Lambda bootstrap runs, also called in-process
//! by the local stack (`fleetctl local`), so both run the same code.

pub mod handler;
