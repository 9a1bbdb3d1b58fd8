// The WebSocket session (SPEC §4, §5, §8): handshake, requests matched by
// request_id, events, approvals, and reconnection with backoff.

import { randomB64, signDevice, verifyServer, signed, signPasskey } from "./keys.js";
import { actionDigest } from "./jcs.js";

const MAX_BACKOFF_MS = 30000;

export class ServerError extends Error {
  constructor(code, message) {
    super(message || code);
    this.code = code;
  }
}

function wsUrl() {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
}

/** Opens a socket and resolves with it and its first frame (the challenge). */
function openWithChallenge() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl());
    ws.onmessage = (e) => {
      ws.onmessage = null;
      ws.onclose = null;
      try {
        resolve({ ws, challenge: JSON.parse(e.data) });
      } catch (err) {
        reject(err);
      }
    };
    ws.onclose = (e) => reject(new ServerError("closed", `the connection closed (${e.code})`));
  });
}

/** Waits for the handshake's answer: the `okType` frame, or auth_error. */
function handshakeAnswer(ws, okType) {
  return new Promise((resolve, reject) => {
    ws.onmessage = (e) => {
      const f = JSON.parse(e.data);
      if (f.type === okType) resolve(f);
      else if (f.type === "auth_error") reject(new ServerError(f.code, f.message));
    };
    ws.onclose = (e) =>
      reject(new ServerError(e.code === 4408 ? "timeout" : "closed",
        e.code === 4408 ? "the server stopped waiting for the handshake (authentication timeout)" : `the connection closed (${e.code})`));
  });
}

/**
 * Pairs this browser (SPEC §4 step 3, §11): `makeKeys()` resolves with the
 * device key and passkey, made before the socket opens so that only the
 * passkey assertion runs inside the server's handshake deadline.
 */
export async function pair({ code, deviceName, device, passkey, identity }) {
  const { ws, challenge } = await openWithChallenge();
  try {
    const clientNonce = randomB64();
    const text = signed.pair(challenge.server_key, challenge.nonce, code, device.publicKey, passkey.publicKey, clientNonce);
    const signature = await signDevice(identity, text);
    const approvalSignature = await signPasskey(identity, text);
    ws.send(JSON.stringify({
      type: "pair", protocol: 1, code, device_name: deviceName,
      device_public_key: device.publicKey, approval_public_key: passkey.publicKey,
      approval_key_alg: "webauthn-es256", webauthn_credential_id: passkey.credentialId,
      client_nonce: clientNonce, signature, approval_signature: approvalSignature,
    }));
    const ok = await handshakeAnswer(ws, "pair_ok");
    const proof = signed.authOk(challenge.server_key, ok.session_id, ok.device_id, clientNonce);
    if (ok.server_key !== challenge.server_key || !(await verifyServer(ok.server_key, proof, ok.server_signature))) {
      throw new ServerError("bad_signature", "the server's signature does not verify: not pairing with it");
    }
    if (ok.device_id !== device.deviceId) throw new ServerError("invalid_request", "the server named another device id");
    return { serverKey: challenge.server_key };
  } finally {
    ws.close(1000);
  }
}

/** An authenticated session that reconnects by itself. */
export class Session {
  constructor(identity, { onStatus, onFrame }) {
    this.identity = identity;
    this.onStatus = onStatus;
    this.onFrame = onFrame;
    this.ws = null;
    this.pending = new Map();
    this.nextId = 1;
    this.backoff = 1000;
    this.stopped = false;
    this.ready = null;
    this.readyResolve = null;
    this.resetReady();
  }

  resetReady() {
    this.ready = new Promise((r) => (this.readyResolve = r));
  }

  start() {
    this.connect();
  }

  stop() {
    this.stopped = true;
    if (this.ws) this.ws.close(1000);
  }

  async connect() {
    this.onStatus({ state: "connecting" });
    let ws;
    try {
      const opened = await openWithChallenge();
      ws = opened.ws;
      const ch = opened.challenge;
      if (ch.server_key !== this.identity.serverKey) {
        ws.close(1000);
        this.onStatus({ state: "error", message: "this server's key is not the one this browser paired with; pair again" });
        return;
      }
      const clientNonce = randomB64();
      const text = signed.auth(ch.server_key, ch.nonce, this.identity.deviceId, clientNonce, ch.ts);
      ws.send(JSON.stringify({
        type: "auth", protocol: 1, device_id: this.identity.deviceId, nonce: ch.nonce,
        client_nonce: clientNonce, ts: ch.ts, signature: await signDevice(this.identity, text),
      }));
      const ok = await handshakeAnswer(ws, "auth_ok");
      const proof = signed.authOk(ch.server_key, ok.session_id, ok.device_id, clientNonce);
      if (!(await verifyServer(ch.server_key, proof, ok.server_signature))) {
        ws.close(1000);
        this.onStatus({ state: "error", message: "the server's signature does not verify" });
        return;
      }
    } catch (e) {
      if (e.code === "unknown_device" || e.code === "revoked") {
        this.onStatus({ state: "unpaired", message: e.message });
        return;
      }
      this.retry(e.message);
      return;
    }
    this.ws = ws;
    this.backoff = 1000;
    ws.onmessage = (e) => this.onMessage(e.data);
    ws.onclose = (e) => this.onClose(e);
    this.onStatus({ state: "connected" });
    this.readyResolve();
  }

  retry(why) {
    if (this.stopped) return;
    const wait = Math.min(this.backoff, MAX_BACKOFF_MS) * (0.75 + Math.random() * 0.5);
    this.backoff = Math.min(this.backoff * 2, MAX_BACKOFF_MS);
    this.onStatus({ state: "offline", retryInMs: wait, message: why });
    setTimeout(() => this.connect(), wait);
  }

  onClose(e) {
    this.ws = null;
    this.resetReady();
    for (const [, p] of this.pending) p.reject(new ServerError("unavailable", "the connection was lost; retrying"));
    this.pending.clear();
    if (e.code === 4403) {
      this.onStatus({ state: "unpaired", message: "this browser's device was revoked" });
      return;
    }
    this.retry(`connection closed (${e.code})`);
  }

  onMessage(data) {
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    if (f.type === "admin_response" && this.pending.has(f.request_id)) {
      const p = this.pending.get(f.request_id);
      this.pending.delete(f.request_id);
      if (f.payload && f.payload.result === "error") p.reject(new ServerError(f.payload.code, f.payload.message));
      else p.resolve(f.payload);
      return;
    }
    this.onFrame(f);
  }

  /** Sends an admin request; resolves with its payload, rejects with ServerError. */
  async request(action, params = {}) {
    await this.ready;
    const requestId = `web-${this.nextId++}`;
    return new Promise((resolve, reject) => {
      this.pending.set(requestId, { resolve, reject, action, params });
      this.ws.send(JSON.stringify({ type: "admin", request_id: requestId, payload: { action, ...params } }));
    });
  }

  /** The params of this session's request still in flight, if any. */
  sentParams(requestId) {
    const p = this.pending.get(requestId);
    return p ? p.params : undefined;
  }

  /**
   * Answers an approval_request with the passkey, after checking that its
   * action_digest is the digest of the action and params shown.
   */
  async answer(request, decision) {
    const digest = await actionDigest(request.action, request.params);
    if (digest !== request.action_digest) {
      throw new ServerError("digest_mismatch",
        "the request's action_digest does not match its action and params: refusing to sign");
    }
    const text = signed.approval(request.approval_id, request.action_digest, request.challenge, decision);
    const signature = await signPasskey(this.identity, text);
    await this.ready;
    this.ws.send(JSON.stringify({
      type: "approval_response", approval_id: request.approval_id,
      device_id: this.identity.deviceId, decision, signature,
    }));
  }
}
