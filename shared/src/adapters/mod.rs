//! Implementations of the ports: `aws` for the cloud, `embedded` for one laptop.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "embedded")]
pub mod embedded;
