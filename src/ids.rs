//! One home for randomness and the ids the server makes.
//!
//! Every random byte the server uses comes from [`random_bytes`] (the
//! operating system's CSPRNG), and every id it hands out is made by one of
//! the named constructors below, so each format is written down once.

use rand::RngCore;

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// An approval's id: `apr_` + 24 lowercase hex characters (96 bits).
pub fn approval_id() -> String {
    format!("apr_{}", hex::encode(random_bytes::<12>()))
}

/// A fresh approval `challenge`: 32 random bytes, base64url without padding.
pub fn challenge() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

/// A session's id: 32 lowercase hex characters (128 bits).
pub fn session_id() -> String {
    hex::encode(random_bytes::<16>())
}

/// A memory's id: `mem_` + 16 lowercase hex characters (64 bits).
pub fn memory_id() -> String {
    format!("mem_{}", hex::encode(random_bytes::<8>()))
}

/// A secret lease's id: `lease_` + 24 lowercase hex characters (96 bits).
pub fn lease_id() -> String {
    format!("lease_{}", hex::encode(random_bytes::<12>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_tail(id: &str, prefix: &str, len: usize) -> bool {
        id.strip_prefix(prefix).is_some_and(|t| {
            t.len() == len
                && t.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    }

    #[test]
    fn ids_keep_their_formats() {
        assert!(hex_tail(&approval_id(), "apr_", 24));
        assert!(hex_tail(&session_id(), "", 32));
        assert!(hex_tail(&memory_id(), "mem_", 16));
        assert!(hex_tail(&lease_id(), "lease_", 24));
        let c = challenge();
        assert_eq!(crate::auth::keys::unb64(&c).map(|b| b.len()), Some(32));
        assert!(!c.contains('='));
        assert_ne!(approval_id(), approval_id());
        assert_ne!(random_bytes::<16>(), random_bytes::<16>());
    }
}
