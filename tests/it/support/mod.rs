pub mod agent;
pub mod config;
pub mod fake_cp;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod service;
pub mod users;
