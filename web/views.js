// The admin views of SPEC §11. Each view is `async (ctx, root)`; ctx has
// `session` (requests), `notify(text, kind)` and `deviceId`.

import { h, fill, field, when, jsonView } from "./dom.js";

const PER_PAGE = 20;

function errorText(e) {
  return e && e.code ? `${e.message} (${e.code})` : String(e && e.message ? e.message : e);
}

/** Runs a request; on failure shows the server's message and returns null. */
async function run(ctx, action, params, okText) {
  try {
    const r = await ctx.session.request(action, params);
    if (okText !== undefined) ctx.notify(okText || r.message || "Done", "ok");
    return r;
  } catch (e) {
    ctx.notify(errorText(e), "error");
    return null;
  }
}

function toggle(label, checked, onChange) {
  const input = h("input", { type: "checkbox", role: "switch", "aria-label": label });
  const text = h("span", { class: "switch-text", "aria-hidden": "true" }, checked ? "on" : "off");
  input.checked = !!checked;
  input.addEventListener("change", async () => {
    input.disabled = true;
    const ok = await onChange(input.checked);
    if (!ok) input.checked = !input.checked;
    text.textContent = input.checked ? "on" : "off";
    input.disabled = false;
  });
  return h("label", { class: "switch" }, input, text);
}

function table(headers, rows, caption) {
  return h("div", { class: "table-wrap" },
    h("table", {},
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headers.length, class: "empty" }, "Nothing here yet")))));
}

export async function dashboard(ctx, root) {
  const d = await run(ctx, "get_dashboard", {});
  if (!d) return fill(root, h("p", {}, "The dashboard could not be loaded."));
  const stat = (label, value, href) =>
    h("a", { class: "stat", href }, h("span", { class: "stat-value" }, String(value ?? "—")), h("span", { class: "stat-label" }, label));
  fill(root,
    h("h2", {}, "Dashboard"),
    h("p", { class: "status-line" }, d.connected ? "The agent is up and answering." : "The agent is not answering."),
    h("div", { class: "stats" },
      stat("connected devices", d.connected_devices, "#devices"),
      stat("memories", d.memory_count, "#memory"),
      stat("plugins", d.plugin_count, "#extensions"),
      stat("skills", d.skill_count, "#extensions"),
      stat("scheduled tasks", d.scheduled_task_count, "#scheduler"),
      d.secret_count !== undefined ? stat("secrets", d.secret_count, "#secrets") : null),
    h("h3", {}, "Recent task runs"),
    table(["Task", "Started", "Finished", "Result"], (d.recent_executions || []).map((x) =>
      h("tr", {}, h("td", {}, x.task_name), h("td", {}, when(x.started_at)), h("td", {}, when(x.completed_at)),
        h("td", {}, x.completed_at === null ? "running" : x.success ? "ok" : `failed: ${x.error || ""}`)))));
}

export async function extensions(ctx, root) {
  const [p, s] = await Promise.all([run(ctx, "list_plugins", {}), run(ctx, "list_skills", {})]);
  const plugins = p ? p.plugins : [];
  const skills = s ? s.skills : [];
  fill(root,
    h("h2", {}, "Plugins and skills"),
    h("div", { class: "actions" }, h("button", { type: "button", id: "reload-plugins", onclick: async () => {
      const r = await run(ctx, "reload_plugins", {});
      if (r) {
        ctx.notify(`Reloaded ${r.loaded} plugin(s)` + (r.failed.length ? `; ${r.failed.length} failed: ${r.failed.map((f) => `${f.path}: ${f.error}`).join("; ")}` : ""), r.failed.length ? "error" : "ok");
        extensions(ctx, root);
      }
    } }, "Reload plugins")),
    table(["Plugin", "Version", "Type", "Capabilities", "Enabled"], plugins.map((x) =>
      h("tr", { "data-plugin": x.name }, h("td", {}, x.name), h("td", {}, x.version), h("td", {}, x.plugin_type),
        h("td", {}, (x.capabilities || []).join(", ")),
        h("td", {}, toggle(`Plugin ${x.name} enabled`, x.enabled, async (on) =>
          !!(await run(ctx, "toggle_plugin", { name: x.name, enabled: on }, "")))))), "Plugins"),
    table(["Skill", "Description", "Version", "Triggers", "Enabled"], skills.map((x) =>
      h("tr", { "data-skill": x.id }, h("td", {}, x.name), h("td", {}, x.description), h("td", {}, x.version ?? "—"),
        h("td", {}, (x.triggers || []).join(", ")),
        h("td", {}, toggle(`Skill ${x.name} enabled`, x.enabled, async (on) =>
          !!(await run(ctx, "toggle_skill", { id: x.id, enabled: on }, "")))))), "Skills"));
}

function memoryRow(ctx, entry, similarity, after) {
  return h("li", { class: "memory", "data-memory": entry.id },
    h("p", { class: "memory-content" }, entry.content),
    h("p", { class: "meta" },
      similarity !== undefined ? h("span", { class: "similarity" }, `similarity ${similarity.toFixed(3)} · `) : null,
      `${entry.category} · ${entry.confidence} confidence · ${when(entry.created_at)}`,
      (entry.tags || []).length ? ` · tags: ${entry.tags.join(", ")}` : "",
      ` · ${entry.id}`),
    h("button", { type: "button", class: "danger", "aria-label": `Delete memory ${entry.id}`, onclick: async (e) => {
      e.target.disabled = true;
      ctx.notify("Delete requested: approve it on the approval card (passkey).", "info");
      const r = await run(ctx, "delete_memory", { id: entry.id }, "");
      e.target.disabled = false;
      if (r) after();
    } }, "Delete…"));
}

export async function memory(ctx, root, state = { page: 1 }) {
  const list = h("ol", { class: "memories", id: "memory-list" });
  const results = h("ol", { class: "memories", id: "search-results", "aria-live": "polite" });
  const pager = h("nav", { class: "pager", "aria-label": "Memory pages" });
  const reload = () => memory(ctx, root, state);
  const load = async () => {
    const r = await run(ctx, "list_memories", { page: state.page, per_page: PER_PAGE });
    if (!r) return;
    const pages = Math.max(1, Math.ceil(r.total / r.per_page));
    fill(list, r.entries.map((e) => memoryRow(ctx, e, undefined, reload)));
    if (!r.entries.length) list.append(h("li", { class: "empty" }, "No memories on this page."));
    fill(pager,
      h("button", { type: "button", disabled: state.page <= 1, onclick: () => { state.page--; load(); } }, "‹ Newer"),
      h("span", { id: "memory-page" }, `Page ${r.page} of ${pages} · ${r.total} memories`),
      h("button", { type: "button", disabled: state.page >= pages, onclick: () => { state.page++; load(); } }, "Older ›"));
  };
  const query = h("input", { type: "search", required: true, placeholder: "e.g. API authentication patterns" });
  const search = h("form", { class: "inline-form", role: "search", onsubmit: async (e) => {
    e.preventDefault();
    const r = await run(ctx, "search_memories", { query: query.value, limit: 10 });
    if (!r) return;
    fill(results, r.results.map((x) => memoryRow(ctx, x.entry, x.similarity, reload)));
    if (!r.results.length) results.append(h("li", { class: "empty" }, "No match."));
  } }, field("memory-query", "Semantic search", query), h("button", { type: "submit", id: "memory-search" }, "Search"));
  const content = h("textarea", { required: true, rows: 3 });
  const category = h("input", { type: "text", value: "note" });
  const tags = h("input", { type: "text", placeholder: "comma, separated" });
  const confidence = h("select", {}, ["low", "medium", "high"].map((c) => h("option", { value: c, selected: c === "medium" }, c)));
  const create = h("form", { class: "card", onsubmit: async (e) => {
    e.preventDefault();
    const params = { content: content.value, category: category.value || "note", confidence: confidence.value,
      tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean) };
    const r = await run(ctx, "create_memory", params, "");
    if (r) {
      ctx.notify(`Memory ${r.entry.id} saved`, "ok");
      content.value = "";
      tags.value = "";
      state.page = 1;
      load();
    }
  } }, h("h3", {}, "New memory"), field("memory-content", "Content", content),
    h("div", { class: "row" }, field("memory-category", "Category", category), field("memory-tags", "Tags", tags),
      field("memory-confidence", "Confidence", confidence)),
    h("button", { type: "submit", id: "memory-create" }, "Save memory"));
  fill(root, h("h2", {}, "Memory"), search, results, create, h("h3", {}, "All memories, newest first"), pager, list);
  await load();
}

export async function scheduler(ctx, root) {
  const r = await run(ctx, "list_scheduled_tasks", {});
  const tasks = r ? r.tasks : [];
  const history = h("section", { id: "task-history", "aria-live": "polite" });
  // The task whose history is shown, set at once (before its fetch
  // returns), and a counter so that only the latest fetch is drawn: a run
  // that finishes while the first fetch is on its way still shows.
  let shown = null;
  let latest = 0;
  const showHistory = async (name) => {
    shown = name;
    const mine = ++latest;
    const x = await run(ctx, "list_task_executions", { task_name: name, limit: 20 });
    if (!x || mine !== latest) return;
    fill(history, h("h3", {}, `History of ${name}`),
      table(["Started", "Finished", "Result"], x.executions.map((e) =>
        h("tr", {}, h("td", {}, when(e.started_at)), h("td", {}, when(e.completed_at)),
          h("td", {}, e.completed_at === null ? "running" : e.success ? "ok" : `failed: ${e.error || ""}`)))));
  };
  fill(root, h("h2", {}, "Scheduler"),
    table(["Task", "Schedule", "Handler", "Last run", "Next run", "Enabled", ""], tasks.map((t) =>
      h("tr", { "data-task": t.name }, h("td", {}, t.name), h("td", {}, h("code", {}, t.cron_expression)), h("td", {}, t.handler_type),
        h("td", {}, when(t.last_run)), h("td", {}, when(t.next_run)),
        h("td", {}, toggle(`Task ${t.name} enabled`, t.enabled, async (on) =>
          !!(await run(ctx, "toggle_task", { name: t.name, enabled: on }, "")))),
        h("td", { class: "buttons" },
          h("button", { type: "button", onclick: async () => {
            if (await run(ctx, "trigger_task", { name: t.name }, `Task ${t.name} started`)) showHistory(t.name);
          } }, "Run now"),
          h("button", { type: "button", onclick: () => showHistory(t.name) }, "History"))))),
    history);
  ctx.onEvent = (ev) => {
    if (ev.event === "task_started" || ev.event === "task_finished") {
      const name = ev.data && (ev.data.task_name || ev.data.name);
      if (name && name === shown) showHistory(name);
    }
  };
}

const SECTIONS = ["llm", "scheduler", "memory", "approvals", "audit", "secrets", "notify"];

export async function config(ctx, root) {
  const c = await run(ctx, "get_config", {});
  const section = h("select", {}, SECTIONS.map((s) => h("option", { value: s }, s)));
  const value = h("textarea", { rows: 4, spellcheck: "false", placeholder: '{"timeout_secs": 60}' });
  const form = h("form", { class: "card", onsubmit: async (e) => {
    e.preventDefault();
    let v;
    try {
      v = JSON.parse(value.value);
    } catch {
      ctx.notify("The value is not JSON: write an object such as {\"timeout_secs\": 60}", "error");
      return;
    }
    ctx.notify("Change requested: approve it on the approval card (passkey).", "info");
    if (await run(ctx, "update_config", { section: section.value, value: v }, "")) config(ctx, root);
  } }, h("h3", {}, "Edit a section"),
    h("p", { class: "hint" }, "The change is validated first, then waits for an approval with the passkey. Secrets are never shown here."),
    h("div", { class: "row" }, field("config-section", "Section", section), field("config-value", "Value (JSON object)", value)),
    h("button", { type: "submit", id: "config-submit" }, "Request change"));
  fill(root, h("h2", {}, "Configuration"), c ? h("dl", { class: "kv" }, Object.entries(c).filter(([k]) => k !== "result")
    .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))])) : null, form);
}

export async function devices(ctx, root) {
  const r = await run(ctx, "list_devices", {});
  const list = r ? r.devices : [];
  fill(root, h("h2", {}, "Devices"),
    table(["Name", "Id", "Approval key", "Paired", "Last seen", "State", ""], list.map((d) =>
      h("tr", { "data-device": d.device_id }, h("td", {}, d.device_name, d.device_id === ctx.deviceId ? h("span", { class: "badge" }, "this browser") : null),
        h("td", {}, h("code", {}, d.device_id)), h("td", {}, d.approval_key_alg), h("td", {}, when(d.paired_at)),
        h("td", {}, when(d.last_seen)), h("td", {}, d.revoked ? "revoked" : "active"),
        h("td", {}, d.revoked ? null : h("button", { type: "button", class: "danger", onclick: async () => {
          ctx.notify("Revocation requested: approve it on the approval card (passkey).", "info");
          if (await run(ctx, "revoke_device", { device_id: d.device_id }, "")) devices(ctx, root);
        } }, "Revoke…"))))));
}

export async function secrets(ctx, root) {
  const body = h("div", {});
  fill(root, h("h2", {}, "Secrets"), h("p", { class: "hint" },
    "Values are stored encrypted by the server and released to the agent's local processes only after an approval. Setting, deleting and revealing a value each ask for the passkey."), body);
  let listed;
  let leases;
  try {
    [listed, leases] = await Promise.all([ctx.session.request("list_secrets", {}), ctx.session.request("list_secret_leases", {})]);
  } catch (e) {
    fill(body, h("div", { class: "notice", role: "status", id: "secrets-unavailable" },
      h("strong", {}, "Secrets are not available on this server. "), `The server said: ${errorText(e)}`));
    return;
  }
  const name = h("input", { type: "text", required: true, pattern: "[A-Za-z_][A-Za-z0-9_.\\-]{0,63}", autocomplete: "off" });
  const value = h("input", { type: "password", required: true, autocomplete: "off" });
  const description = h("input", { type: "text" });
  const revealed = h("div", { "aria-live": "polite" });
  fill(body,
    table(["Name", "Description", "Updated", "Last released", "Releases", ""], listed.secrets.map((s) =>
      h("tr", { "data-secret": s.name }, h("td", {}, h("code", {}, s.name)), h("td", {}, s.description || ""), h("td", {}, when(s.updated_at)),
        h("td", {}, when(s.last_released_at)), h("td", {}, String(s.release_count)),
        h("td", { class: "buttons" },
          h("button", { type: "button", onclick: async () => {
            ctx.notify("Reveal requested: approve it on the approval card (passkey).", "info");
            const r = await run(ctx, "reveal_secret", { name: s.name });
            if (r) {
              const out = h("input", { type: "text", readonly: true, value: r.value, "aria-label": `Value of ${r.name}` });
              fill(revealed, h("div", { class: "card" }, h("p", {}, `Value of ${r.name} (hidden again when you leave this view):`), out,
                h("button", { type: "button", onclick: () => fill(revealed) }, "Hide")));
            }
          } }, "Reveal…"),
          h("button", { type: "button", class: "danger", onclick: async () => {
            ctx.notify("Deletion requested: approve it on the approval card (passkey).", "info");
            if (await run(ctx, "delete_secret", { name: s.name }, "")) secrets(ctx, root);
          } }, "Delete…")))), "Secrets"),
    revealed,
    h("form", { class: "card", onsubmit: async (e) => {
      e.preventDefault();
      ctx.notify("Setting requested: approve it on the approval card (passkey). The card shows the value as a commitment.", "info");
      const params = { name: name.value, value: value.value };
      if (description.value) params.description = description.value;
      value.value = "";
      if (await run(ctx, "set_secret", params, "")) secrets(ctx, root);
    } }, h("h3", {}, "Set a secret"), h("div", { class: "row" }, field("secret-name", "Name", name),
      field("secret-value", "Value", value), field("secret-description", "Description (optional)", description)),
      h("button", { type: "submit" }, "Request")),
    table(["Lease", "Names", "Requester", "Reason", "Granted", "Expires", ""], leases.leases.map((l) =>
      h("tr", {}, h("td", {}, h("code", {}, l.lease_id)), h("td", {}, (l.names || []).join(", ")),
        h("td", {}, l.requester ? `${l.requester.kind} ${l.requester.key}` : ""), h("td", {}, l.reason || ""),
        h("td", {}, when(l.granted_at)), h("td", {}, when(l.expires_at)),
        h("td", {}, h("button", { type: "button", onclick: async () => {
          if (await run(ctx, "revoke_secret_lease", { lease_id: l.lease_id }, "Lease revoked")) secrets(ctx, root);
        } }, "Revoke")))), "Leases"));
}
