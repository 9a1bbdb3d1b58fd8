// Tiny DOM helpers: every text goes in through textContent, never HTML.

/** Builds an element: h("button", {class: "x", onclick: f}, "text", child). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A labelled form field: returns [label, input]. */
export function field(id, label, input) {
  input.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), input);
}

/** RFC 3339 or Unix ms to a short local date-time; "—" for none. */
export function when(t) {
  if (t === null || t === undefined || t === "") return "—";
  const d = new Date(t);
  if (Number.isNaN(d.getTime())) return String(t);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/** JSON with redaction tags (`[redacted:…]`) marked for display. */
export function jsonView(value) {
  const pre = h("pre", { class: "json" });
  const text = JSON.stringify(value, null, 2);
  const re = /\[redacted(?::[0-9a-f]*)?\]/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    pre.append(document.createTextNode(text.slice(last, m.index)));
    pre.append(h("mark", { class: "redacted", title: "a secret value: shown as a commitment, never in clear" }, m[0]));
    last = m.index + m[0].length;
  }
  pre.append(document.createTextNode(text.slice(last)));
  return pre;
}
