//! `store_secret`: a named random secret, created once and then stable.
//! (That it survives a reopen — and, for a shared store, that every node
//! reads the same bytes — is what "persisted" means; each store's own tests
//! show the reopen.)

use std::sync::Arc;

use crate::Store;

/// The first call creates a 32-byte secret; later calls return the same bytes.
pub async fn secret_is_created_once_and_then_stable(store: &dyn Store) {
    let first = store.store_secret("page-token").await.expect("secret");
    assert_eq!(first.len(), 32, "a fresh secret is 32 bytes");
    assert!(first.iter().any(|b| *b != 0), "a fresh secret is random");
    for _ in 0..3 {
        assert_eq!(
            store
                .store_secret("page-token")
                .await
                .expect("secret again"),
            first
        );
    }
}

/// Each name has its own secret.
pub async fn secrets_with_different_names_differ(store: &dyn Store) {
    let a = store.store_secret("a").await.expect("secret a");
    let b = store.store_secret("b").await.expect("secret b");
    assert_ne!(a, b);
    assert_eq!(store.store_secret("a").await.expect("a again"), a);
}

/// Callers racing for a secret that does not exist yet all get the one that
/// was stored (create-if-absent, then read what is there).
pub async fn concurrent_first_calls_agree_on_one_secret(store: Arc<dyn Store>) {
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.store_secret("raced").await })
        })
        .collect();
    let mut got = Vec::new();
    for c in calls {
        got.push(c.await.expect("task").expect("secret"));
    }
    assert!(got.iter().all(|s| *s == got[0]), "all callers agree");
    assert_eq!(store.store_secret("raced").await.expect("after"), got[0]);
}
