//! `airlock.toml` parsing, exactly as the binary does it: the binary's
//! `config.rs` is compiled into this target by path (it depends only on
//! library crates). Any input must give a config or a `ConfigError` naming
//! the file, never a panic.
#![no_main]
#![allow(dead_code)]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/airlock/src/config.rs"]
mod config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::Config::parse("fuzz.toml", text) {
        Ok(_) => {}
        Err(e) => assert!(e.to_string().starts_with("fuzz.toml: "), "{e}"),
    }
});
