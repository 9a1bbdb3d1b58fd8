//! Actions, one module per domain. This file is the dispatch table: every
//! action the server answers is named here once. Gated actions (biometric
//! approval) are registered with `gate::register_gated`.

pub mod approvals;
pub mod config;
pub mod dashboard;
pub mod devices;
pub mod gate;
pub mod memory;
pub mod plugins;
pub mod scheduler;
pub mod secrets;
pub mod skills;

use crate::rpc::{Actions, register};
use gate::register_gated;

/// Sets a plugin/skill/task toggle through its [`Toggles`] (persisted, then
/// in memory) and words the answer (`"<Label> 'NAME' enabled"`).
///
/// [`Toggles`]: crate::storage::toggles::Toggles
pub(crate) async fn persist_toggle(
    toggles: &crate::storage::toggles::Toggles,
    label: &str,
    name: &str,
    enabled: bool,
) -> crate::rpc::ActionResult {
    toggles
        .set(name, enabled)
        .await
        .map_err(|e| crate::protocol::ApiError::internal(e.to_string()))?;
    let word = if enabled { "enabled" } else { "disabled" };
    Ok(serde_json::json!({"result": "success", "message": format!("{label} '{name}' {word}")}))
}

/// The registry of every action (the dispatch table below), for `state`.
/// `rpc` knows how to call actions; this module knows which there are.
pub fn registry(state: std::sync::Arc<crate::state::AppState>) -> crate::rpc::Registry {
    let mut actions = Actions::new(state);
    register_all(&mut actions);
    crate::rpc::Registry::new(actions)
}

pub fn register_all(m: &mut Actions) {
    register(m, "get_dashboard", dashboard::get_dashboard);
    register(m, "get_config", config::get_config);
    register(m, "list_devices", devices::list_devices);
    register(m, "list_approvals", approvals::list_approvals);
    register(m, "list_plugins", plugins::list_plugins);
    register(m, "toggle_plugin", plugins::toggle_plugin);
    register(m, "reload_plugins", plugins::reload_plugins);
    register(m, "list_skills", skills::list_skills);
    register(m, "toggle_skill", skills::toggle_skill);
    register_gated(
        m,
        "update_config",
        config::prepare_update,
        config::update_config,
    );
    register(m, "list_scheduled_tasks", scheduler::list_scheduled_tasks);
    register(m, "toggle_task", scheduler::toggle_task);
    register(m, "trigger_task", scheduler::trigger_task);
    register(m, "list_task_executions", scheduler::list_task_executions);
    register(m, "create_memory", memory::create_memory);
    register(m, "list_memories", memory::list_memories);
    register(m, "search_memories", memory::search_memories);
    register_gated(
        m,
        "delete_memory",
        memory::prepare_delete,
        memory::delete_memory,
    );
    register_gated(
        m,
        "revoke_device",
        devices::prepare_revoke,
        devices::revoke_device,
    );
    register(m, "list_secrets", secrets::list_secrets);
    register_gated(m, "set_secret", secrets::prepare_set, secrets::set_secret);
    register_gated(
        m,
        "delete_secret",
        secrets::prepare_delete,
        secrets::delete_secret,
    );
    gate::register_gated_for_caller(
        m,
        "reveal_secret",
        secrets::prepare_reveal,
        secrets::reveal_secret,
    );
    register(m, "list_secret_leases", secrets::list_secret_leases);
    register(m, "revoke_secret_lease", secrets::revoke_secret_lease);
}
