//! Password hashing (Argon2id) with memory that stays put.
//!
//! The `argon2` crate allocates about 19 MiB for every hash and frees it; glibc's allocator then
//! keeps much of it (its mmap threshold rises after the first free), and a single thread that
//! hashed 20 times held 211 MiB. Verification — what anyone on the internet can trigger — runs
//! here instead on memory each thread allocates once and reuses. It runs only on the login
//! service's hashing threads ([`crate::throttle::HashGate`]), so the total is their number
//! × 19 MiB. Hashing a new password (at a first login, which needs a valid signup secret) uses
//! the crate's own path.

use std::cell::RefCell;

use argon2::password_hash::PasswordHasher;
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};

thread_local! {
    /// This thread's Argon2 working memory, grown once to the largest cost seen.
    static MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// An Argon2id PHC string of `password` with the default parameters every stored hash uses.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `password` matches the PHC string `phc`, computed on this thread's reused memory.
/// A malformed `phc` is a mismatch.
pub fn verify(password: &str, phc: &str) -> bool {
    let Ok(h) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&h.salt, &h.hash) else {
        return false;
    };
    let Ok(params) = Params::try_from(&h) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(h.algorithm.as_str()) else {
        return false;
    };
    let version = match h.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    // A stored hash asks for at most this much memory (64 MiB); anything bigger is refused.
    if params.block_count() > 64 * 1024 {
        return false;
    }
    let mut out = vec![0u8; expected.len()];
    let computed = MEMORY.with(|m| {
        let mut m = m.borrow_mut();
        let n = params.block_count();
        if m.len() < n {
            m.resize(n, Block::default());
        }
        Argon2::new(algorithm, version, params).hash_password_into_with_memory(
            password.as_bytes(),
            salt.as_ref(),
            &mut out,
            &mut m[..n],
        )
    });
    computed.is_ok() && argon2::password_hash::phc::Output::new(&out).is_ok_and(|o| &o == expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordVerifier;

    #[test]
    fn verify_agrees_with_the_crate() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(verify("correct horse battery", &h));
        assert!(!verify("wrong", &h));
        assert!(!verify("x", "not a phc string"));
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse battery", &parsed)
                .is_ok()
        );
    }
}
