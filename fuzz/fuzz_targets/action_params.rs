//! Fuzz target: params parsing of every registered action. The first byte
//! picks the action; the rest is the params text. Parsing must answer
//! Ok or a clear `invalid_request`, never panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use secrets_agent::protocol::ErrorCode;
use secrets_agent::rpc::Registry;

fn registry() -> &'static (Registry, Vec<&'static str>) {
    static R: OnceLock<(Registry, Vec<&'static str>)> = OnceLock::new();
    R.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let state = rt.block_on(async { secrets_agent::server::test_state(&dir) });
        std::mem::forget(rt);
        let registry = secrets_agent::handlers::registry(state);
        let names = registry.action_names();
        assert!(!names.is_empty());
        (registry, names)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let (registry, names) = registry();
    let action = names[*first as usize % names.len()];
    if let Err(e) = registry.check_params(action, Some(text)) {
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{action}: {e}");
    }
});
