// This browser's identity: a WebCrypto Ed25519 device key (non-extractable,
// kept in IndexedDB) and a WebAuthn passkey as the approval key (SPEC §11).

import { sha256, hex } from "./jcs.js";

const DB_NAME = "secrets-agent";
const STORE = "identity";
const KEY = "device";

export const enc = new TextEncoder();

export function b64u(bytes) {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function unb64u(text) {
  const s = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

export function randomB64(n = 32) {
  return b64u(crypto.getRandomValues(new Uint8Array(n)));
}

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function tx(mode, f) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const t = db.transaction(STORE, mode);
      const req = f(t.objectStore(STORE));
      t.oncomplete = () => resolve(req && req.result);
      t.onerror = () => reject(t.error);
      t.onabort = () => reject(t.error);
    });
  } finally {
    db.close();
  }
}

/** The stored identity, or null before pairing. */
export async function loadIdentity() {
  return (await tx("readonly", (s) => s.get(KEY))) || null;
}

export async function saveIdentity(identity) {
  await tx("readwrite", (s) => s.put(identity, KEY));
}

export async function forgetIdentity() {
  await tx("readwrite", (s) => s.delete(KEY));
}

/** A new Ed25519 device key: the private half can sign but never be exported. */
export async function newDeviceKey() {
  const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
  const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  const deviceId = hex((await sha256(raw)).slice(0, 16));
  return { privateKey: pair.privateKey, publicKey: b64u(raw), deviceId };
}

export async function signDevice(identity, text) {
  const sig = await crypto.subtle.sign({ name: "Ed25519" }, identity.privateKey, enc.encode(text));
  return b64u(sig);
}

/** Verifies the server's Ed25519 signature against the pinned server key. */
export async function verifyServer(serverKey, text, signature) {
  try {
    const key = await crypto.subtle.importKey("raw", unb64u(serverKey), { name: "Ed25519" }, false, ["verify"]);
    return await crypto.subtle.verify({ name: "Ed25519" }, key, unb64u(signature), enc.encode(text));
  } catch {
    return false;
  }
}

/** Creates the passkey: platform authenticator, user verification required. */
export async function newPasskey(deviceName) {
  const cred = await navigator.credentials.create({
    publicKey: {
      rp: { id: location.hostname, name: "secrets-agent" },
      user: { id: crypto.getRandomValues(new Uint8Array(16)), name: deviceName, displayName: deviceName },
      challenge: crypto.getRandomValues(new Uint8Array(32)),
      pubKeyCredParams: [{ type: "public-key", alg: -7 }],
      authenticatorSelection: {
        authenticatorAttachment: "platform",
        userVerification: "required",
        residentKey: "preferred",
      },
      attestation: "none",
      timeout: 120000,
    },
  });
  if (cred.response.getPublicKeyAlgorithm() !== -7) throw new Error("the passkey is not a P-256 (ES256) key");
  return { credentialId: b64u(cred.rawId), publicKey: b64u(cred.response.getPublicKey()) };
}

/**
 * Signs `text` with the passkey (SPEC §11): challenge = SHA-256(text); the
 * result is the object the server checks.
 */
export async function signPasskey(identity, text) {
  const challenge = await sha256(enc.encode(text));
  const cred = await navigator.credentials.get({
    publicKey: {
      challenge,
      rpId: location.hostname,
      allowCredentials: [{ type: "public-key", id: unb64u(identity.credentialId) }],
      userVerification: "required",
      timeout: 120000,
    },
  });
  return {
    authenticator_data: b64u(cred.response.authenticatorData),
    client_data_json: b64u(cred.response.clientDataJSON),
    signature: b64u(cred.response.signature),
  };
}

/** The signed strings of SPEC §4. */
export const signed = {
  auth: (serverKey, nonce, deviceId, clientNonce, ts) =>
    ["secrets-agent/v1/auth", serverKey, nonce, deviceId, clientNonce, String(ts)].join("\n"),
  authOk: (serverKey, sessionId, deviceId, clientNonce) =>
    ["secrets-agent/v1/auth-ok", serverKey, sessionId, deviceId, clientNonce].join("\n"),
  pair: (serverKey, nonce, code, devicePk, approvalPk, clientNonce) =>
    ["secrets-agent/v1/pair", serverKey, nonce, code, devicePk, approvalPk, clientNonce].join("\n"),
  approval: (approvalId, digest, challenge, decision) =>
    ["secrets-agent/v1/approval", approvalId, digest, challenge, decision].join("\n"),
};
