pub mod agent;
pub mod fake_cp;
pub mod sshd;
pub mod users;
