pub mod agent;
pub mod fake_cp;
pub mod service;
pub mod users;
