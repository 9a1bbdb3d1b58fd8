// The web companion (SPEC §11): pairing, then the admin views, live events
// and passkey approvals over one WebSocket session.

import { h, fill, when, jsonView } from "./dom.js";
import { loadIdentity, saveIdentity, forgetIdentity, newDeviceKey, newPasskey } from "./keys.js";
import { actionDigest, checkOwnParams } from "./jcs.js";
import { unb64u } from "./keys.js";
import { pair, Session } from "./api.js";
import * as views from "./views.js";

const VIEWS = {
  dashboard: ["Dashboard", views.dashboard],
  extensions: ["Plugins & skills", views.extensions],
  memory: ["Memory", views.memory],
  scheduler: ["Scheduler", views.scheduler],
  config: ["Configuration", views.config],
  devices: ["Devices", views.devices],
  approvals: ["Approvals", null],
  secrets: ["Secrets", views.secrets],
};

const $ = (id) => document.getElementById(id);
const approvals = new Map(); // approval_id -> {request, card, ...}
const own = new Map(); // approval_id -> {params, key}: this page's own requests (approval_pending)
let deviceNames = new Map();
let ctx = null;

function notify(text, kind = "info") {
  const box = $("notice");
  fill(box, h("p", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" }, text));
}

function setStatus(s) {
  const el = $("conn");
  el.dataset.state = s.state;
  const text = {
    connecting: "Connecting…",
    connected: "Connected",
    offline: `Offline — retrying in ${Math.ceil((s.retryInMs || 0) / 1000)} s`,
    unpaired: "Not paired",
    error: "Error",
  }[s.state];
  fill(el, h("span", { class: "dot", "aria-hidden": "true" }), text);
  el.title = s.message || "";
  if (s.state === "connected") onConnected();
  if (s.state === "unpaired") {
    notify(`${s.message}. Pair this browser again.`, "error");
    forgetIdentity().then(() => showPairing());
  }
  if (s.state === "error") notify(s.message, "error");
}

/** Why this page cannot hold keys here, or null (WebCrypto and WebAuthn need a secure context and a host name). */
function environmentProblem() {
  const host = location.hostname;
  if (!window.isSecureContext) {
    return [
      `This page was loaded over plain http:// from ${host}, which is not a secure context.`,
      "Browsers offer passkeys (WebAuthn) and the key storage this page needs only to secure contexts:",
      "https:// with a certificate the phone trusts, or http://localhost on the agent's own machine.",
      "Configure server.tls_cert, server.tls_key and a host name in server.web_origin, then open https://NAME:PORT/ (see docs/web.md).",
    ].join(" ");
  }
  if (/^[0-9.]+$/.test(host) || host.includes(":")) {
    return `This page was opened by IP address (${host}). Passkeys need a host name: open http://localhost:${location.port}/ on this machine, or the host name in server.web_origin.`;
  }
  if (!window.PublicKeyCredential || !crypto.subtle) {
    return "This browser offers no passkeys (WebAuthn) or no WebCrypto: use a current Chrome, Safari, Edge or Firefox.";
  }
  return null;
}

function showProblem(text) {
  fill($("app"), h("section", { class: "card problem", id: "secure-context", role: "alert" },
    h("h2", {}, "This page cannot work from this address"), h("p", {}, text)));
}

function showPairing(codeFromUrl = "") {
  const code = h("input", { id: "pair-code", type: "text", required: true, autocomplete: "one-time-code", value: codeFromUrl,
    placeholder: "XXXX-XXXX", spellcheck: "false", "aria-describedby": "pair-help" });
  const name = h("input", { id: "pair-name", type: "text", required: true, maxlength: 64, value: defaultName() });
  const status = h("p", { id: "pair-status", role: "status", "aria-live": "polite" });
  const button = h("button", { type: "submit", id: "pair-submit" }, "Pair with a passkey");
  const form = h("form", { class: "card pairing", onsubmit: async (e) => {
    e.preventDefault();
    button.disabled = true;
    try {
      fill(status, "Creating this browser's keys — your device will ask for Face ID, a fingerprint or its PIN…");
      const deviceName = name.value.trim();
      const device = await newDeviceKey();
      const passkey = await newPasskey(deviceName);
      const identity = { privateKey: device.privateKey, publicKey: device.publicKey, deviceId: device.deviceId,
        credentialId: passkey.credentialId, approvalPublicKey: passkey.publicKey, deviceName };
      fill(status, "Confirm the pairing with the passkey…");
      const { serverKey } = await pair({ code: code.value.trim(), deviceName, device, passkey, identity });
      identity.serverKey = serverKey;
      await saveIdentity(identity);
      fill(status, "Paired.");
      start(identity);
    } catch (err) {
      const msg = err && err.name === "NotAllowedError"
        ? "The passkey request was cancelled or not allowed (user verification is required)."
        : `${err.message || err}${err.code ? ` (${err.code})` : ""}`;
      fill(status, h("span", { class: "error-text" }, `Pairing failed: ${msg}`));
      button.disabled = false;
    }
  } },
    h("h2", {}, "Pair this browser"),
    h("p", { id: "pair-help" }, "Make a one-time code on the agent's machine with ", h("code", {}, "secrets-agent pair"),
      " (or scan the QR code of ", h("code", {}, "secrets-agent pair --qr"), "). This browser gets its own device key, and a passkey that approves destructive actions only after your device verifies you."),
    h("div", { class: "field" }, h("label", { for: "pair-code" }, "Pairing code"), code),
    h("div", { class: "field" }, h("label", { for: "pair-name" }, "Name of this device"), name),
    button, status);
  fill($("app"), form);
  fill($("nav"));
  (codeFromUrl ? name : code).focus();
}

function defaultName() {
  const ua = navigator.userAgent;
  const os = /iPhone|iPad/.test(ua) ? "iPhone" : /Android/.test(ua) ? "Android" : /Mac/.test(ua) ? "Mac" : /Windows/.test(ua) ? "Windows" : "Linux";
  return `Browser on ${os}`;
}

function renderNav(active) {
  fill($("nav"), Object.entries(VIEWS).map(([id, [label]]) =>
    h("a", { href: `#${id}`, "aria-current": id === active ? "page" : false, id: `nav-${id}` }, label,
      id === "approvals" && approvals.size ? h("span", { class: "count", "aria-label": `${approvals.size} pending` }, String(approvals.size)) : null)));
}

async function route() {
  if (!ctx) return;
  const id = (location.hash.slice(1) || "dashboard").split("?")[0];
  const [, view] = VIEWS[id] || VIEWS.dashboard;
  const active = VIEWS[id] ? id : "dashboard";
  renderNav(active);
  ctx.onEvent = null;
  fill($("notice"));
  const root = $("view");
  root.dataset.view = active;
  if (active === "approvals") return renderApprovalsView(root);
  fill(root, h("p", { class: "loading" }, "Loading…"));
  await view(ctx, root);
  root.dataset.loaded = active;
}

function renderApprovalsView(root) {
  fill(root, h("h2", {}, "Approvals"),
    approvals.size ? h("p", {}, "Pending approvals are shown in the approval panel.") : h("p", { class: "empty" }, "No approval is pending."));
  root.dataset.loaded = "approvals";
}

function deviceLabel(id) {
  if (id === null || id === undefined) return "a local process (no device)";
  const name = deviceNames.get(id);
  const mine = ctx && id === ctx.deviceId ? " — this browser" : "";
  return name ? `${name} (${id.slice(0, 8)}…)${mine}` : `${id}${mine}`;
}

async function onConnected() {
  try {
    const d = await ctx.session.request("list_devices", {});
    deviceNames = new Map(d.devices.map((x) => [x.device_id, x.device_name]));
    const p = await ctx.session.request("list_approvals", {});
    // Cards decided or expired while this page was offline go.
    const live = new Set(p.approvals.map((a) => a.approval_id));
    for (const id of [...approvals.keys()]) if (!live.has(id)) dropApproval(id, "no longer pending");
    for (const a of p.approvals) showApproval(a);
  } catch (e) {
    notify(e.message, "error");
  }
  route();
}

function showApproval(request) {
  if (approvals.has(request.approval_id)) return;
  const panel = $("approvals");
  const check = h("p", { class: "digest" }, "Checking the digest…");
  const mine = h("p", { class: "own" });
  const error = h("p", { class: "error-text", role: "alert" });
  const expires = h("span", {}, when(request.expires_at));
  const approve = h("button", { type: "button", class: "approve", disabled: true }, "Approve with passkey");
  const deny = h("button", { type: "button", class: "danger", disabled: true }, "Deny with passkey");
  // A secret release comes from a local process, named in its params (SPEC §10).
  const proc = request.origin_device_id == null && request.params && request.params.requester;
  const requester = proc
    ? ` — ${proc.kind} ${proc.key}${proc.pid != null ? `, pid ${proc.pid}` : ""}${proc.exe ? `, ${proc.exe}` : ""}`
    : "";
  const card = h("article", { class: "approval card", "data-approval": request.approval_id, "aria-labelledby": `t-${request.approval_id}` },
    h("h3", { id: `t-${request.approval_id}` }, request.summary),
    h("dl", { class: "kv" },
      h("dt", {}, "Action"), h("dd", {}, h("code", { class: "action" }, request.action)),
      h("dt", {}, "Requested by"), h("dd", { class: "requester" }, deviceLabel(request.origin_device_id) + requester),
      h("dt", {}, "Expires"), h("dd", {}, expires),
      h("dt", {}, "Approval id"), h("dd", {}, h("code", {}, request.approval_id))),
    h("p", { class: "params-label" }, "Parameters (secret values appear as commitments):"),
    jsonView(request.params), check, mine, error, h("div", { class: "buttons" }, approve, deny));
  const answer = async (decision) => {
    approve.disabled = deny.disabled = true;
    fill(error);
    try {
      await ctx.session.answer(request, decision);
      fill(check, `Sent: ${decision}. Waiting for the server…`);
    } catch (e) {
      const msg = e.name === "NotAllowedError" ? "The passkey request was cancelled or not allowed." : e.message;
      fill(error, msg);
      approve.disabled = deny.disabled = e.code === "digest_mismatch";
      approve.disabled ||= entry.refused;
    }
  };
  approve.addEventListener("click", () => answer("approve"));
  deny.addEventListener("click", () => answer("deny"));
  if (request.origin_device_id && !deviceNames.has(request.origin_device_id)) {
    // A device paired since this page last asked: learn its name.
    ctx.session.request("list_devices", {}).then((d) => {
      deviceNames = new Map(d.devices.map((x) => [x.device_id, x.device_name]));
      const dd = card.querySelector(".requester");
      if (dd) dd.textContent = deviceLabel(request.origin_device_id) + requester;
    }, () => {});
  }
  const entry = { request, card, check, mine, error, approve, deny, refused: false };
  approvals.set(request.approval_id, entry);
  panel.append(card);
  panel.hidden = false;
  renderNav($("view").dataset.view);
  actionDigest(request.action, request.params).then((d) => {
    if (d === request.action_digest) {
      fill(check, h("span", { class: "ok-text" }, "✓ The digest matches this action and these parameters."));
      deny.disabled = false;
      approve.disabled = entry.refused;
      checkOwn(request.approval_id);
    } else {
      fill(check, h("span", { class: "error-text" }, "✗ The digest does NOT match the action and parameters shown: this page will not sign it."));
      card.classList.add("mismatch");
    }
  }, (e) => fill(check, h("span", { class: "error-text" }, `The digest cannot be checked (${e.message}): this page will not sign it.`)));
}

/** For this page's own request: are the params shown the ones it sent? */
async function checkOwn(id) {
  const a = approvals.get(id);
  const o = own.get(id);
  if (!a || !o || o.params === undefined) return;
  const diff = await checkOwnParams(o.params, a.request.params, o.key);
  if (diff) {
    a.refused = true;
    a.approve.disabled = true;
    a.card.classList.add("mismatch");
    fill(a.mine, h("span", { class: "error-text" }, `✗ This browser asked for something else (${diff}): it will not approve this.`));
  } else {
    fill(a.mine, h("span", { class: "ok-text" }, "✓ These are exactly the parameters this browser sent."));
  }
}

function dropApproval(id, status) {
  own.delete(id);
  const a = approvals.get(id);
  if (!a) return;
  approvals.delete(id);
  a.card.remove();
  $("approvals").hidden = approvals.size === 0;
  notify(`Approval ${id}: ${status} — ${a.request.summary}`, status === "approved" ? "ok" : "info");
  renderNav($("view").dataset.view);
  if ($("view").dataset.view === "approvals") renderApprovalsView($("view"));
}

function onFrame(f) {
  if (f.type === "approval_request") return showApproval(f);
  if (f.type === "approval_result") return dropApproval(f.approval_id, f.status);
  if (f.type === "error") {
    const a = f.approval_id && approvals.get(f.approval_id);
    if (a) {
      fill(a.error, `The server refused the answer: ${f.message} (${f.code})`);
      a.approve.disabled = a.refused;
      a.deny.disabled = false;
    } else notify(`${f.message} (${f.code})`, "error");
    return;
  }
  if (f.type === "event") {
    if (f.event === "approval_pending" && f.data) {
      const key = f.data.commitment_key ? unb64u(f.data.commitment_key) : null;
      own.set(f.data.approval_id, { params: ctx.session.sentParams(f.data.request_id), key });
      checkOwn(f.data.approval_id);
      return;
    }
    if (ctx.onEvent) ctx.onEvent(f);
    if (f.event === "task_finished" && f.data) {
      const ok = f.data.success;
      notify(`Task ${f.data.task_name || ""} finished${ok === false ? ` with an error: ${f.data.error || ""}` : ""}`, ok === false ? "error" : "info");
    }
    const v = $("view").dataset.view;
    if (v === "dashboard" && (f.event === "task_started" || f.event === "task_finished")) route();
  }
}

function start(identity) {
  if (ctx) ctx.session.stop();
  const session = new Session(identity, { onStatus: setStatus, onFrame });
  ctx = { session, notify, deviceId: identity.deviceId, onEvent: null };
  fill($("app"), h("div", { class: "layout" },
    h("section", { id: "approvals", class: "approvals", "aria-label": "Pending approvals", "aria-live": "polite", hidden: true },
      h("h2", {}, "Waiting for your approval")),
    h("section", { id: "view", "aria-live": "polite" })));
  $("whoami").textContent = identity.deviceName || "";
  session.start();
}

async function main() {
  window.addEventListener("hashchange", () => {
    // Only view names route (the skip link's #main does not).
    if (!VIEWS[location.hash.slice(1)]) return;
    route();
  });
  const problem = environmentProblem();
  if (problem) return showProblem(problem);
  let code = "";
  if (location.hash.startsWith("#pair=")) {
    code = decodeURIComponent(location.hash.slice(6));
    // The code leaves the address bar and the history at once.
    history.replaceState(null, "", location.pathname);
  }
  const identity = await loadIdentity().catch(() => null);
  if (identity && !code) start(identity);
  else showPairing(code);
}

main();
