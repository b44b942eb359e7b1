pub mod fake_cp;
