//! Fleet health (pure): [`presence`], each device's connectivity from IoT Core's lifecycle
//! events, in session order whatever order they arrive in.

pub mod presence;
