//! Who is on the other end: the server's identity, signed byte strings,
//! pairing codes, the handshake and its rate limits.

pub mod handshake;
pub mod keys;
pub mod last_seen;
pub mod pairing;
pub mod ratelimit;
pub mod webauthn;
