// RFC 8785 JSON Canonicalization Scheme for values from JSON.parse, and the
// approval digest of SPEC §8: hex(SHA-256(JCS({"action":..,"params":..}))).

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
