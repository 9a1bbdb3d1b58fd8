// RFC 8785 JSON Canonicalization Scheme for values from JSON.parse, the
// approval digest of SPEC §8 (hex(SHA-256(JCS({"action":..,"params":..})))),
// and the check of a secret commitment against the value this page sent.

/** Canonical JSON text of a JSON value (objects, arrays, strings, finite numbers, booleans, null). */
export function canonicalize(v) {
  if (v === null) return "null";
  switch (typeof v) {
    case "boolean":
      return v ? "true" : "false";
    case "number":
      if (!Number.isFinite(v)) throw new Error("JCS: a number is not finite");
      // ECMAScript's Number-to-String is the serialisation RFC 8785 prescribes.
      return Object.is(v, -0) ? "0" : String(v);
    case "string":
      return JSON.stringify(v);
    case "object": {
      if (Array.isArray(v)) return "[" + v.map(canonicalize).join(",") + "]";
      // Keys sorted by UTF-16 code units: JavaScript's default string order.
      const keys = Object.keys(v).sort();
      return "{" + keys.map((k) => JSON.stringify(k) + ":" + canonicalize(v[k])).join(",") + "}";
    }
    default:
      throw new Error("JCS: not a JSON value");
  }
}

export function hex(bytes) {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

/** The `action_digest` the page computes itself before any passkey prompt. */
export async function actionDigest(action, params) {
  const text = canonicalize({ action, params });
  return hex(await sha256(new TextEncoder().encode(text)));
}

/** The TAG of a secret commitment (SPEC §8): 16 hex chars of HMAC-SHA256(K, value). */
async function commitmentTag(keyBytes, message) {
  const key = await crypto.subtle.importKey("raw", keyBytes, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(message)));
  return hex(mac.slice(0, 8));
}

/**
 * For this browser's own request: null if `shown` (the approval's params)
 * are exactly the params it sent, each `[redacted:TAG]` recomputed with the
 * request's commitment key; else what differs.
 */
export async function checkOwnParams(sent, shown, keyBytes, path = "params") {
  if (canonicalize(sent) === canonicalize(shown)) return null;
  if (typeof shown === "string" && shown.startsWith("[redacted:") && shown.endsWith("]")) {
    if (!keyBytes) return `${path}: committed, but no commitment key arrived`;
    const message = typeof sent === "string" ? sent : canonicalize(sent);
    const tag = await commitmentTag(keyBytes, message);
    return tag === shown.slice(10, -1) ? null : `${path}: the commitment is not the one of the value sent`;
  }
  const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  if (isObj(sent) && isObj(shown)) {
    const a = Object.keys(sent);
    const b = Object.keys(shown);
    if (a.length !== b.length || a.some((k) => !(k in shown))) return `${path}: other keys than the ones sent`;
    for (const k of a) {
      const d = await checkOwnParams(sent[k], shown[k], keyBytes, `${path}.${k}`);
      if (d) return d;
    }
    return null;
  }
  if (Array.isArray(sent) && Array.isArray(shown) && sent.length === shown.length) {
    for (let i = 0; i < sent.length; i++) {
      const d = await checkOwnParams(sent[i], shown[i], keyBytes, `${path}[${i}]`);
      if (d) return d;
    }
    return null;
  }
  return `${path}: not the value sent`;
}
