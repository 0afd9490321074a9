//! `coatcheck serve` security as operators run it: `--keys` reloaded on
//! SIGHUP, a non-loopback bind (refused without keys, allowed with them),
//! `--tls-cert`/`--tls-key` (also reloaded on SIGHUP), and `coatcheck keys`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::proc::Serve;

fn key_entry(secret: &str, role: &str, tenant: &str) -> String {
    format!("[[key]]\nsecret = \"{secret}\"\nrole = \"{role}\"\ntenant = \"{tenant}\"\n\n")
}

async fn status_with(http: &reqwest::Client, url: &str, key: Option<&str>) -> u16 {
    let mut b = http.get(format!("{url}/v1/requests"));
    if let Some(k) = key {
        b = b.bearer_auth(k);
    }
    b.send().await.expect("GET").status().as_u16()
}

/// Polls until `key` gets `want` (a reload is asynchronous to the signal).
async fn eventually(http: &reqwest::Client, url: &str, key: &str, want: u16) {
    let start = Instant::now();
    loop {
        let got = status_with(http, url, Some(key)).await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{key} still gets {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const OLD: &str = "ck_old_key_for_the_reload_test_1";
const NEW: &str = "ck_new_key_for_the_reload_test_2";

#[tokio::test]
async fn keys_are_reloaded_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, key_entry(OLD, "client", "t")).unwrap();
    let data = dir.path().join("data");
    let p = Serve::with_args(&[
        "--listen",
        "127.0.0.1:0",
        "--data",
        data.to_str().unwrap(),
        "--keys",
        keys.to_str().unwrap(),
    ]);
    let http = reqwest::Client::new();
    assert_eq!(status_with(&http, &p.url, None).await, 401);
    assert_eq!(status_with(&http, &p.url, Some(OLD)).await, 200);
    assert_eq!(status_with(&http, &p.url, Some(NEW)).await, 401);
    // Rotation, step 1: add the new key next to the old one; both work.
    std::fs::write(
        &keys,
        key_entry(OLD, "client", "t") + &key_entry(NEW, "client", "t"),
    )
    .unwrap();
    p.signal("-HUP");
    eventually(&http, &p.url, NEW, 200).await;
    assert_eq!(status_with(&http, &p.url, Some(OLD)).await, 200);
    // Step 2: remove the old one.
    std::fs::write(&keys, key_entry(NEW, "client", "t")).unwrap();
    p.signal("-HUP");
    eventually(&http, &p.url, OLD, 401).await;
    assert_eq!(status_with(&http, &p.url, Some(NEW)).await, 200);
    // A broken file is not loaded; the keys in force stay, the server lives.
    std::fs::write(&keys, "[[key]]\nrole = \"client\"\n").unwrap();
    p.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status_with(&http, &p.url, Some(NEW)).await, 200);
    p.stop();
}

#[tokio::test]
async fn a_non_loopback_address_needs_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    // No keys, or a keys file with none in it: refused with a clear message.
    for extra in [vec![], vec!["--keys", empty.to_str().unwrap()]] {
        let mut args = vec!["serve", "--listen", "0.0.0.0:0", "--data", d];
        args.extend(extra);
        let out = crate::proc::run(&args, None);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("non-loopback") && err.contains("--insecure-no-auth"),
            "{err}"
        );
    }
    // With keys it serves (and every call needs one); reached via loopback here.
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, key_entry(OLD, "admin", "t")).unwrap();
    let p = Serve::with_args(&[
        "--listen",
        "0.0.0.0:0",
        "--data",
        d,
        "--keys",
        keys.to_str().unwrap(),
    ]);
    let port = p.url.rsplit(':').next().unwrap().to_string();
    assert!(p.url.starts_with("http://0.0.0.0:"), "{}", p.url);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    assert_eq!(status_with(&http, &url, None).await, 401);
    assert_eq!(status_with(&http, &url, Some(OLD)).await, 200);
    p.stop();
    // --insecure-no-auth is the explicit way to serve a trusted network without keys.
    let p = Serve::with_args(&["--listen", "0.0.0.0:0", "--data", d, "--insecure-no-auth"]);
    let port = p.url.rsplit(':').next().unwrap().to_string();
    let url = format!("http://127.0.0.1:{port}");
    assert_eq!(status_with(&http, &url, None).await, 200);
    p.stop();
}

/// Writes a self-signed certificate for 127.0.0.1 and its key; returns the
/// certificate PEM.
fn write_cert(dir: &Path) -> String {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("certificate");
    let pem = ck.cert.pem();
    std::fs::write(dir.join("cert.pem"), &pem).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    pem
}

fn trusting(pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn tls_flags_serve_https_and_the_certificate_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let pem = write_cert(dir.path());
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let data = dir.path().join("data");
    let p = Serve::with_args(&[
        "--listen",
        "127.0.0.1:0",
        "--data",
        data.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert!(p.url.starts_with("https://127.0.0.1:"), "{}", p.url);
    let old = trusting(&pem);
    let resp = old
        .post(format!("{}/v1/queues/q/requests", p.url))
        .json(&json!({"input": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let plain = p.url.replacen("https://", "http://", 1);
    assert!(reqwest::get(format!("{plain}/healthz")).await.is_err());
    // A renewed certificate: written, SIGHUP, new connections get it.
    let pem2 = write_cert(dir.path());
    p.signal("-HUP");
    let fresh = trusting(&pem2);
    let start = Instant::now();
    while fresh
        .get(format!("{}/healthz", p.url))
        .send()
        .await
        .is_err()
    {
        assert!(start.elapsed() < Duration::from_secs(10), "not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.stop();
}

#[test]
fn bad_tls_and_timeout_flags_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path());
    let d = dir.path().join("data");
    let d = d.to_str().unwrap();
    let cert = dir.path().join("cert.pem");
    let cert = cert.to_str().unwrap();
    let missing = dir.path().join("nope.pem");
    let missing = missing.to_str().unwrap();
    let base = ["serve", "--listen", "127.0.0.1:0", "--data", d];
    for (extra, needle) in [
        (vec!["--tls-cert", cert], "--tls-key"),
        (vec!["--tls-cert", cert, "--tls-key", missing], "nope.pem"),
        (vec!["--tls-cert", cert, "--tls-key", cert], "cert.pem"),
        (vec!["--header-timeout", "0"], "--header-timeout"),
        (vec!["--body-timeout=-1"], "--body-timeout"),
    ] {
        let mut args = base.to_vec();
        args.extend(extra);
        let out = crate::proc::run(&args, None);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn keys_new_prints_a_key_and_an_entry_the_server_accepts() {
    let out = crate::proc::run(
        &[
            "keys", "new", "--role", "worker", "--tenant", "acme", "--name", "w1", "--queue",
            "jobs",
        ],
        None,
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .expect("a key line")
        .to_string();
    assert!(key.starts_with("ck_") && key.len() > 40, "{key}");
    assert!(
        !text.contains("secret ="),
        "the entry holds only the hash: {text}"
    );
    let entry = &text[text.find("[[key]]").expect("an entry")..];
    // `keys hash` agrees with the entry's hash.
    let hashed = crate::proc::run(&["keys", "hash"], Some(&format!("{key}\n")));
    let hash = String::from_utf8_lossy(&hashed.stdout).trim().to_string();
    assert!(
        entry.contains(&format!("hash = \"{hash}\"")),
        "{entry} / {hash}"
    );
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, entry).unwrap();
    let data = dir.path().join("data");
    let p = Serve::with_args(&[
        "--listen",
        "127.0.0.1:0",
        "--data",
        data.to_str().unwrap(),
        "--keys",
        keys.to_str().unwrap(),
    ]);
    let http = reqwest::Client::new();
    let claim = |q: &str| {
        http.post(format!("{}/v1/queues/{q}/claims", p.url))
            .bearer_auth(&key)
            .json(&json!({"worker_id": "w"}))
            .send()
    };
    assert_eq!(claim("jobs").await.unwrap().status(), 200);
    assert_eq!(
        claim("other").await.unwrap().status(),
        403,
        "its queue allowlist"
    );
    let submit = http
        .post(format!("{}/v1/queues/jobs/requests", p.url))
        .bearer_auth(&key)
        .json(&json!({"input": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(submit.status(), 403, "a worker key does not submit");
    p.stop();
}
