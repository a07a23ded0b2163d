//! What operators see: metrics, health endpoints and logs.

pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;

pub use health::Health;
pub use metrics::Metrics;
